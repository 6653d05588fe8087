//! Tollgate's domain: accounts, identity, audit and email rules as types and pure
//! functions, plus the [`Store`] trait every database backend implements.
//!
//! Nothing here speaks HTTP, SQL or Redis. The server calls the flows in
//! [`identity`]; each flow ends in exactly one [`Store`] method, which the backend runs
//! as one transaction.

pub mod accounts;
pub mod admin;
pub mod api_keys;
pub mod audit;
pub mod billing;
pub mod credits;
pub mod email;
pub mod entitlements;
pub mod identity;
pub mod ids;
pub mod metering;
pub mod plans;
pub mod ratelimit;
pub mod reports;
pub mod store;
pub mod system;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use store::{Store, StoreError};

/// All timestamps in Tollgate are UTC.
pub type Timestamp = time::OffsetDateTime;
