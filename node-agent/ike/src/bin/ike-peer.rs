//! A thin UDP driver around [`dmvpn_ike::Endpoint`], for interop tests and manual checks.
//! It binds UDP 500 and 4500 on `--local`, optionally initiates towards `--initiate`, and
//! prints one line per event on stdout. Exits 0 once a CHILD SA is up (unless `--stay`),
//! 1 on a failure, 2 on a usage or configuration error.
//!
//! ```text
//! ike-peer --local 198.51.100.2 [--initiate 198.51.100.1] (--psk SECRET | --cert C.der --key K.p8 --ca CA.der)
//!          [--id IP|FQDN] [--mode transport|tunnel] [--encap] [--dh x25519|p256] [--stay SECS]
//!          [--rekey] [--rekey-ike] [--no-pfs] [--fragment-size BYTES] [--cookie-threshold N] [--dpd SECS] [--retransmit-ms MS] [--retransmit-tries N] [--delete] [--esp-probe]
//!
//! `--esp-probe` installs the CHILD SA in `dmvpn_esp`, sends one ESP packet per second (a GRE
//! packet, inside an IPv4 header in tunnel mode) and prints `ESP_IN` for each ESP packet that
//! opens with the inbound keys: a cross-check of the keys with the peer's ESP.
//! ```

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use dmvpn_ike::{AuthConfig, ChildMode, Config, DhGroup, Endpoint, Event, Identity};
use zeroize::Zeroizing;

struct Args {
    local: IpAddr,
    initiate: Option<IpAddr>,
    config: Config,
    stay: Option<Duration>,
    rekey: bool,
    delete: bool,
    timeout: Duration,
    esp_probe: bool,
    rekey_ike: bool,
}

fn usage(msg: &str) -> String {
    format!(
        "{msg}\nusage: ike-peer --local IP [--initiate IP] (--psk SECRET | --cert C.der --key K.p8 --ca CA.der) \
         [--id IP|FQDN] [--mode transport|tunnel] [--encap] [--dh x25519|p256] [--stay SECS] [--rekey] [--rekey-ike] [--no-pfs] [--fragment-size BYTES] [--cookie-threshold N] [--dpd SECS] [--retransmit-ms MS] [--retransmit-tries N] [--delete] [--timeout SECS] [--esp-probe]"
    )
}

fn read(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut local = None;
    let mut initiate = None;
    let mut psk = None;
    let (mut cert, mut key, mut ca) = (None, None, None);
    let mut id = None;
    let mut mode = ChildMode::Transport;
    let mut encap = false;
    let mut dh = None;
    let mut stay = None;
    let mut rekey = false;
    let mut delete = false;
    let mut timeout = Duration::from_secs(20);
    let mut esp_probe = false;
    let mut rekey_ike = false;
    let mut no_pfs = false;
    let mut cookie_threshold = None;
    let mut dpd = None;
    let mut retransmit_ms = None;
    let mut retransmit_tries = None;
    let mut fragment_size = None;
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--local" => {
                local = Some(
                    val()?
                        .parse::<IpAddr>()
                        .map_err(|e| usage(&e.to_string()))?,
                )
            }
            "--initiate" => {
                initiate = Some(
                    val()?
                        .parse::<IpAddr>()
                        .map_err(|e| usage(&e.to_string()))?,
                )
            }
            "--psk" => psk = Some(val()?),
            "--cert" => cert = Some(read(&val()?)?),
            "--key" => key = Some(read(&val()?)?),
            "--ca" => ca = Some(read(&val()?)?),
            "--id" => {
                let v = val()?;
                id = Some(match v.parse::<IpAddr>() {
                    Ok(ip) => Identity::Ip(ip),
                    Err(_) => Identity::Fqdn(v),
                });
            }
            "--mode" => {
                mode = match val()?.as_str() {
                    "transport" => ChildMode::Transport,
                    "tunnel" => ChildMode::Tunnel,
                    m => return Err(usage(&format!("unknown mode {m}"))),
                }
            }
            "--encap" => encap = true,
            "--dh" => {
                dh = Some(match val()?.as_str() {
                    "x25519" => DhGroup::X25519,
                    "p256" => DhGroup::P256,
                    g => return Err(usage(&format!("unknown group {g}"))),
                })
            }
            "--stay" => {
                stay = Some(Duration::from_secs(
                    val()?.parse().map_err(|_| usage("--stay takes seconds"))?,
                ))
            }
            "--timeout" => {
                timeout = Duration::from_secs(
                    val()?
                        .parse()
                        .map_err(|_| usage("--timeout takes seconds"))?,
                )
            }
            "--rekey" => rekey = true,
            "--delete" => delete = true,
            "--esp-probe" => esp_probe = true,
            "--help" | "-h" => {
                println!("{}", usage("ike-peer: a UDP driver for dmvpn-ike"));
                std::process::exit(0);
            }
            "--rekey-ike" => rekey_ike = true,
            "--no-pfs" => no_pfs = true,
            "--cookie-threshold" => {
                cookie_threshold = Some(
                    val()?
                        .parse()
                        .map_err(|_| usage("--cookie-threshold takes a count"))?,
                )
            }
            "--dpd" => {
                dpd = Some(Duration::from_secs(
                    val()?.parse().map_err(|_| usage("--dpd takes seconds"))?,
                ))
            }
            "--retransmit-ms" => {
                retransmit_ms = Some(
                    val()?
                        .parse()
                        .map_err(|_| usage("--retransmit-ms takes milliseconds"))?,
                )
            }
            "--retransmit-tries" => {
                retransmit_tries = Some(
                    val()?
                        .parse()
                        .map_err(|_| usage("--retransmit-tries takes a count"))?,
                )
            }
            "--fragment-size" => {
                fragment_size = Some(
                    val()?
                        .parse()
                        .map_err(|_| usage("--fragment-size takes bytes"))?,
                )
            }
            _ => return Err(usage(&format!("unknown argument {a}"))),
        }
    }
    let local = local.ok_or_else(|| usage("--local is required"))?;
    let auth = match (psk, cert, key, ca) {
        (Some(p), None, None, None) => AuthConfig::Psk(Zeroizing::new(p.into_bytes())),
        (None, Some(cert), Some(key), Some(ca)) => AuthConfig::Certificate {
            cert,
            key_pkcs8: Zeroizing::new(key),
            cas: vec![ca],
        },
        _ => return Err(usage("give either --psk or all of --cert, --key and --ca")),
    };
    let mut config = Config::new(local, auth);
    config.mode = mode;
    config.force_udp_encap = encap;
    config.child_pfs = !no_pfs;
    if let Some(c) = cookie_threshold {
        config.cookie_threshold = c;
    }
    if dpd.is_some() {
        config.dpd_interval = dpd;
    }
    if let Some(ms) = retransmit_ms {
        config.retransmit_initial = Duration::from_millis(ms);
    }
    if let Some(t) = retransmit_tries {
        config.retransmit_tries = t;
    }
    if let Some(f) = fragment_size {
        config.fragment_size = f;
    }
    if let Some(id) = id {
        config.local_id = id;
    }
    if let Some(g) = dh {
        config.ike_dh = vec![g];
    }
    Ok(Args {
        local,
        initiate,
        config,
        stay,
        rekey,
        delete,
        timeout,
        esp_probe,
        rekey_ike,
    })
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ike-peer: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> Result<ExitCode, String> {
    let bind = |port| {
        let s = UdpSocket::bind(SocketAddr::new(args.local, port))
            .map_err(|e| format!("bind {}:{port}: {e}", args.local))?;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        Ok::<_, String>(s)
    };
    let socks = [bind(dmvpn_ike::IKE_PORT)?, bind(dmvpn_ike::NAT_T_PORT)?];
    let start = Instant::now();
    let mut ep = Endpoint::new(args.config, start).map_err(|e| e.to_string())?;
    if let Some(peer) = args.initiate {
        ep.initiate(start, peer).map_err(|e| e.to_string())?;
    }
    let mut buf = vec![0u8; 65536];
    let mut done_at: Option<Instant> = None;
    let mut result = None;
    let mut peer_up = None;
    let mut did_rekey = false;
    let mut did_rekey_ike = false;
    let mut rekeyed_child = false;
    let mut probe: Option<Probe> = None;
    loop {
        let now = Instant::now();
        for s in &socks {
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let local = s.local_addr().map_err(|e| e.to_string())?;
                let Some(d) = buf.get_mut(..n) else { continue };
                if local.port() == dmvpn_ike::NAT_T_PORT
                    && !d.starts_with(&[0, 0, 0, 0])
                    && d.len() > 1
                {
                    if let Some(p) = probe.as_mut() {
                        p.open(now, d);
                    }
                    continue;
                }
                ep.handle_datagram(now, from, local, d);
            }
        }
        if let Some(p) = probe.as_mut() {
            p.tick(now, &socks[1]);
        }
        if ep.poll_timeout().is_some_and(|t| t <= now) {
            ep.handle_timeout(now);
        }
        while let Some(t) = ep.poll_transmit() {
            let s = if t.src.port() == dmvpn_ike::NAT_T_PORT {
                &socks[1]
            } else {
                &socks[0]
            };
            if let Err(e) = s.send_to(&t.payload, t.dst) {
                eprintln!("send to {}: {e}", t.dst);
            }
        }
        while let Some(ev) = ep.poll_event() {
            match &ev {
                Event::IkeSaUp {
                    peer,
                    peer_identity,
                    remote,
                    nat,
                } => {
                    println!(
                        "IKE_SA_UP peer={peer} identity={peer_identity} remote={remote} nat={nat}"
                    );
                    peer_up = Some(*peer);
                }
                Event::ChildSaUp {
                    peer,
                    keys,
                    lifetime,
                    rekeys,
                } => {
                    println!(
                        "CHILD_SA_UP peer={peer} spi_in={:08x} spi_out={:08x} suite={} esn={} mode={:?} encap={:?} rekeys={:?} lifetime={}s",
                        keys.spi_in,
                        keys.spi_out,
                        keys.suite,
                        keys.esn,
                        keys.mode,
                        keys.udp_encap,
                        rekeys.map(|s| format!("{s:08x}")),
                        lifetime.as_secs()
                    );
                    if rekeys.is_some() {
                        println!("REKEYED");
                        rekeyed_child = true;
                    }
                    if args.esp_probe {
                        match Probe::new(now, args.local, *peer, keys) {
                            Ok(p) => probe = Some(p),
                            Err(e) => println!("ESP_PROBE_ERROR {e}"),
                        }
                    }
                    if result.is_none() {
                        result = Some(0);
                        done_at = Some(now + args.stay.unwrap_or_default());
                    }
                }
                Event::ChildSaDown {
                    peer,
                    spi_in,
                    spi_out,
                } => {
                    println!("CHILD_SA_DOWN peer={peer} spi_in={spi_in:08x} spi_out={spi_out:08x}")
                }
                Event::IkeSaDown { peer } => println!("IKE_SA_DOWN peer={peer}"),
                Event::IkeSaRekeyed { peer } => println!("IKE_SA_REKEYED peer={peer}"),
                Event::Failed {
                    peer,
                    reason,
                    detail,
                } => {
                    println!("FAILED peer={peer} reason={reason} detail={detail}");
                    if result.is_none() {
                        result = Some(1);
                        done_at = Some(now + args.stay.unwrap_or_default());
                    }
                }
            }
        }
        if args.rekey
            && !did_rekey
            && result == Some(0)
            && let Some(p) = peer_up
        {
            did_rekey = true;
            if let Err(e) = ep.rekey_child(now, p) {
                println!("REKEY_ERROR {e}");
            }
        }
        if args.rekey_ike
            && !did_rekey_ike
            && result == Some(0)
            && (rekeyed_child || !args.rekey)
            && let Some(p) = peer_up
        {
            did_rekey_ike = true;
            if let Err(e) = ep.rekey_ike(now, p) {
                println!("REKEY_ERROR {e}");
            }
        }
        if let Some(d) = done_at
            && now >= d
        {
            if args.delete
                && let Some(p) = peer_up
            {
                let _ = ep.delete(now, p);
                args_delete_flush(&mut ep, &socks, &mut buf)?;
            }
            let s = ep.stats();
            println!("STATS {s:?}");
            return Ok(ExitCode::from(result.unwrap_or(1)));
        }
        if now.duration_since(start) > args.timeout && result.is_none() {
            println!("FAILED reason=driver-timeout");
            return Ok(ExitCode::from(1));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Gives a delete request up to two seconds to be answered.
fn args_delete_flush(
    ep: &mut Endpoint,
    socks: &[UdpSocket; 2],
    buf: &mut [u8],
) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until && ep.ike_sa_count() > 0 {
        let now = Instant::now();
        while let Some(t) = ep.poll_transmit() {
            let s = if t.src.port() == dmvpn_ike::NAT_T_PORT {
                &socks[1]
            } else {
                &socks[0]
            };
            let _ = s.send_to(&t.payload, t.dst);
        }
        for s in socks {
            while let Ok((n, from)) = s.recv_from(buf) {
                let local = s.local_addr().map_err(|e| e.to_string())?;
                if let Some(d) = buf.get(..n) {
                    ep.handle_datagram(now, from, local, d);
                }
            }
        }
        while let Some(ev) = ep.poll_event() {
            println!("{ev:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Sends and opens ESP with the keys of the newest CHILD SA.
struct Probe {
    local: IpAddr,
    peer: IpAddr,
    tunnel: bool,
    encap: Option<(u16, u16)>,
    tx: dmvpn_esp::OutboundSa,
    rx: dmvpn_esp::InboundSa,
    next: Instant,
}

impl Probe {
    fn new(
        now: Instant,
        local: IpAddr,
        peer: IpAddr,
        keys: &dmvpn_ike::ChildSaKeys,
    ) -> Result<Probe, String> {
        let tx = keys
            .outbound()
            .and_then(|s| s.into_outbound(now))
            .map_err(|e| e.to_string())?;
        let rx = keys
            .inbound()
            .and_then(|s| s.into_inbound(now))
            .map_err(|e| e.to_string())?;
        Ok(Probe {
            local,
            peer,
            tunnel: keys.mode == ChildMode::Tunnel,
            encap: keys.udp_encap,
            tx,
            rx,
            next: now,
        })
    }

    fn open(&mut self, now: Instant, esp: &mut [u8]) {
        match self.rx.open_in_place(now, esp) {
            Ok(o) => println!(
                "ESP_IN spi={:08x} seq={} next_header={} len={}",
                self.rx.spi(),
                o.seq,
                o.next_header,
                o.payload.len()
            ),
            Err(e) => println!("ESP_IN_ERROR {e}"),
        }
    }

    fn tick(&mut self, now: Instant, sock: &UdpSocket) {
        if now < self.next {
            return;
        }
        self.next = now + Duration::from_secs(1);
        // GRE header (no key) carrying a few bytes of "IPv4".
        let gre = [0u8, 0, 0x08, 0, 0x45, 0, 0, 0];
        let (payload, nh) = match (self.tunnel, self.local, self.peer) {
            (true, IpAddr::V4(s), IpAddr::V4(d)) => {
                let total = u16::try_from(20 + gre.len()).unwrap_or(0);
                let mut ip = vec![0x45, 0];
                ip.extend_from_slice(&total.to_be_bytes());
                ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 47, 0, 0]);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                let sum = checksum(&ip);
                if let Some(c) = ip.get_mut(10..12) {
                    c.copy_from_slice(&sum.to_be_bytes());
                }
                ip.extend_from_slice(&gre);
                (ip, 4u8)
            }
            _ => (gre.to_vec(), 47u8),
        };
        let mut out = Vec::new();
        if let Err(e) = self.tx.seal_to_vec(now, nh, &payload, &mut out) {
            println!("ESP_OUT_ERROR {e}");
            return;
        }
        match self.encap {
            Some((_, rport)) => match sock.send_to(&out, SocketAddr::new(self.peer, rport)) {
                Ok(_) => println!("ESP_OUT spi={:08x} len={}", self.tx.spi(), out.len()),
                Err(e) => println!("ESP_OUT_ERROR {e}"),
            },
            None => println!(
                "ESP_OUT_SKIPPED raw ESP (protocol 50) needs the data plane, not this driver"
            ),
        }
    }
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in b.chunks(2) {
        let hi = u32::from(c.first().copied().unwrap_or(0));
        let lo = u32::from(c.get(1).copied().unwrap_or(0));
        sum += (hi << 8) | lo;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0)
}
