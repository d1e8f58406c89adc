//! Client addresses as the per-address limits count them.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// The unit per-address limits count: an IPv4 address, or an IPv6 /64.
///
/// An IPv6 host is usually given a whole /64 (SLAAC, privacy addresses, a
/// subscriber's prefix), so counting each IPv6 address apart would let one
/// client take 2^64 places. An IPv4-mapped IPv6 address counts as its IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddressGroup(IpAddr);

/// The length of the IPv6 prefix counted as one client.
pub const IPV6_PREFIX_BITS: u32 = 64;

impl AddressGroup {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let mask = u128::MAX << (128 - IPV6_PREFIX_BITS);
                    Self(IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask)))
                }
            },
        }
    }
}

impl fmt::Display for AddressGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/{IPV6_PREFIX_BITS}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(text: &str) -> AddressGroup {
        AddressGroup::of(text.parse().unwrap())
    }

    #[test]
    fn an_ipv6_slash_64_is_one_client_and_ipv4_addresses_are_apart() {
        assert_eq!(group("2001:db8:1:2::1"), group("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_ne!(group("2001:db8:1:2::1"), group("2001:db8:1:3::1"));
        assert_eq!(group("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
        assert_ne!(group("10.0.0.1"), group("10.0.0.2"));
        assert_eq!(group("::ffff:10.0.0.1"), group("10.0.0.1"));
        assert_eq!(group("10.0.0.1").to_string(), "10.0.0.1");
    }
}
