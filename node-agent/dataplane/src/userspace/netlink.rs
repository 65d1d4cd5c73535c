//! Interface configuration through rtnetlink: addresses, link up, kernel routes into the TUN.

use std::net::IpAddr;

use ipnet::IpNet;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::DataPlaneError;

/// A netlink handle bound to the network namespace the data plane was started in.
pub(crate) struct Netlink {
    handle: Handle,
    ifindex: u32,
    metric: u32,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn nl_err(what: &str, e: rtnetlink::Error) -> DataPlaneError {
    DataPlaneError::Netlink(format!("{what}: {e}"))
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

impl Netlink {
    /// Opens a netlink connection in the current network namespace.
    pub(crate) fn open(ifindex: u32, metric: u32) -> Result<Self, DataPlaneError> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| DataPlaneError::Netlink(format!("cannot open a netlink socket: {e}")))?;
        let task = tokio::spawn(conn);
        Ok(Self {
            handle,
            ifindex,
            metric,
            task,
        })
    }

    /// Adds `addr` to the interface (an existing identical address is fine) and sets the
    /// link up.
    pub(crate) async fn configure(&self, addrs: &[IpNet]) -> Result<(), DataPlaneError> {
        for a in addrs {
            let r = self
                .handle
                .address()
                .add(self.ifindex, a.addr(), a.prefix_len())
                .execute()
                .await;
            match r {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(nl_err(&format!("adding address {a}"), e)),
            }
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(self.ifindex).up().build())
            .execute()
            .await
            .map_err(|e| nl_err("setting the TUN link up", e))
    }

    fn route_msg(
        &self,
        prefix: IpNet,
    ) -> Result<rtnetlink::packet_route::route::RouteMessage, DataPlaneError> {
        let prefix = prefix.trunc();
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(prefix.addr(), prefix.prefix_len())
            .map_err(|e| DataPlaneError::Netlink(format!("route {prefix}: {e}")))?
            .output_interface(self.ifindex)
            // Our own metric: "replace" then only ever replaces our route, never an
            // existing underlay route for the same prefix (e.g. the default route), which
            // keeps its lower metric and wins.
            .priority(self.metric)
            .build())
    }

    /// Adds or replaces a kernel route `prefix dev <tun>`.
    pub(crate) async fn route_add(&self, prefix: IpNet) -> Result<(), DataPlaneError> {
        let msg = self.route_msg(prefix)?;
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| nl_err(&format!("adding kernel route {prefix} into the TUN"), e))
    }

    /// Deletes the kernel route `prefix dev <tun>`; a missing route is not an error.
    pub(crate) async fn route_del(&self, prefix: IpNet) -> Result<(), DataPlaneError> {
        let msg = self.route_msg(prefix)?;
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT)) => Ok(()),
            Err(e) => Err(nl_err(&format!("deleting kernel route {prefix}"), e)),
        }
    }
}
