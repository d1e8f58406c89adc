//! How many connections a listener holds, and for how long: the caps, sized
//! to the pod's memory and the process's open-file limit.

use std::time::Duration;

/// Limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections from one client address at most.
    pub max_per_address: usize,
    /// A request head must arrive within this, and an idle keep-alive
    /// connection is closed after it.
    pub header_read_timeout: Duration,
    /// The largest request head (request line and headers) read; each
    /// connection's read buffer grows to this at most.
    pub max_header_bytes: usize,
    /// The longest in-flight requests get to finish after shutdown begins.
    pub drain_timeout: Duration,
    /// How long a write may make no progress (the client reads nothing)
    /// before the connection is closed.
    pub write_stall: Duration,
    /// Connections one consumer may have protected from eviction at once:
    /// a quarter of the listener, so no consumer, however many addresses it
    /// connects from, can hold the listener against the others (its further
    /// connections are served, but may be closed for a newcomer).
    pub max_proven_per_consumer: usize,
}

/// The consumer API's caps, sized for the chart's 128 MiB: a connection
/// costs about 30 KiB at most (16 KiB head buffer, hyper's and rustls's
/// buffers), so 1024 of them stay near 30 MiB.
pub const API_MAX_CONNECTIONS: usize = 1024;
/// Engines behind one address (a node, a mesh sidecar) share this.
pub const API_MAX_PER_ADDRESS: usize = 512;
/// The admin listener serves a few scrapers and probes.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;
/// One address's share of the admin listener: a kubelet probes from its
/// node's address and Prometheus scrapes from its own, each with a
/// connection or two, so no one address may take more than a quarter.
pub const ADMIN_MAX_PER_ADDRESS: usize = 16;
/// hyper's smallest read buffer, and the largest head read: twice the API's
/// own limit ([`crate::http::MAX_HEAD_BYTES`]), so that one answers 431 in
/// problem+json before this cuts off.
pub const MAX_HEAD_READ: usize = 16 * 1024;
/// File descriptors kept free of connections (files, sockets to Kraken and
/// the API server, the listeners themselves).
const RESERVED_FDS: u64 = 64;

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: API_MAX_CONNECTIONS,
            max_per_address: API_MAX_PER_ADDRESS,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: MAX_HEAD_READ,
            drain_timeout: Duration::from_secs(25),
            write_stall: super::stall::WRITE_STALL,
            max_proven_per_consumer: API_MAX_CONNECTIONS / 4,
        }
    }
}

impl ServerLimits {
    /// The same limits, sized for the admin listener.
    pub fn for_admin(self) -> Self {
        Self {
            max_connections: self.max_connections.min(ADMIN_MAX_CONNECTIONS),
            max_per_address: self.max_per_address.min(ADMIN_MAX_PER_ADDRESS),
            ..self
        }
    }

    /// Caps that fit `open_files` descriptors, with the admin listener's
    /// share and a reserve left over.
    pub fn fitting(self, open_files: u64) -> Self {
        let room = open_files
            .saturating_sub(RESERVED_FDS + ADMIN_MAX_CONNECTIONS as u64)
            .max(16);
        let max_connections = self.max_connections.min(usize::try_from(room).unwrap_or(usize::MAX));
        Self {
            max_connections,
            max_per_address: self.max_per_address.min(max_connections),
            max_proven_per_consumer: self.max_proven_per_consumer.min(max_connections / 4).max(1),
            ..self
        }
    }
}

/// Raises the soft limit of open files to the hard one and returns it, so
/// the connection caps can be sized to what the process may really open.
pub fn raise_open_files_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (current, hard) = (limit.current.unwrap_or(u64::MAX), limit.maximum);
    let wanted = hard.unwrap_or(1 << 20).min(1 << 20);
    if current < wanted {
        let raised = rustix::process::Rlimit {
            current: Some(wanted),
            maximum: hard,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return wanted;
        }
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_fit_the_open_file_limit() {
        let limits = ServerLimits::default();
        assert_eq!(limits.fitting(1 << 20).max_connections, API_MAX_CONNECTIONS);
        let tight = limits.fitting(1024);
        assert_eq!(tight.max_connections, 1024 - 64 - ADMIN_MAX_CONNECTIONS);
        assert!(tight.max_per_address <= tight.max_connections);
        assert_eq!(limits.for_admin().max_connections, ADMIN_MAX_CONNECTIONS);
        assert_eq!(limits.for_admin().max_per_address, ADMIN_MAX_PER_ADDRESS);
    }
}
