//! The validation pass, one section per file: each turns its section as
//! written into typed config, recording every problem with its line.

pub(super) mod accounts;
pub(super) mod audit;
pub(super) mod consumers;
pub(super) mod kraken;
pub(super) mod kubernetes;
pub(super) mod listen;
