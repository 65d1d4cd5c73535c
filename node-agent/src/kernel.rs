//! Kernel routes into the TUN device (rtnetlink), so that the kernel hands overlay traffic to
//! the userspace data plane. The agent owns these routes (the data plane is started with
//! `manage_kernel_routes = false`): the configured `overlay_routes` stay installed for the
//! agent's lifetime, even while every NHS is down, so overlay traffic is never leaked to the
//! underlay's default route.

use std::net::IpAddr;

use ipnet::IpNet;
use rtnetlink::{Handle, RouteMessageBuilder};

/// A netlink connection in the agent's network namespace.
pub struct Kernel {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

impl Kernel {
    /// Opens the connection; must be called inside a tokio runtime.
    pub fn open() -> Result<Kernel, String> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| format!("cannot open a netlink socket: {e}"))?;
        let task = tokio::spawn(conn);
        Ok(Kernel { handle, task })
    }

    fn route_msg(
        prefix: IpNet,
        ifindex: u32,
    ) -> Result<rtnetlink::packet_route::route::RouteMessage, String> {
        let prefix = prefix.trunc();
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(prefix.addr(), prefix.prefix_len())
            .map_err(|e| format!("route {prefix}: {e}"))?
            .output_interface(ifindex)
            .build())
    }

    /// Adds or replaces `prefix dev <ifindex>`.
    pub async fn route_add(&self, prefix: IpNet, ifindex: u32) -> Result<(), String> {
        let msg = Self::route_msg(prefix, ifindex)?;
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| format!("adding kernel route {prefix} into the tunnel: {e}"))
    }

    /// Deletes `prefix dev <ifindex>`; a route that is already gone is not an error.
    pub async fn route_del(&self, prefix: IpNet, ifindex: u32) -> Result<(), String> {
        let msg = Self::route_msg(prefix, ifindex)?;
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT | libc::ENODEV)) => {
                Ok(())
            }
            Err(e) => Err(format!("deleting kernel route {prefix}: {e}")),
        }
    }
}
