//! HTTP handlers, one module per URL area. Handlers stay thin: extract, call one
//! identity flow, shape the answer.

pub mod accounts;
pub mod admin;
pub mod admin_accounts;
pub mod admin_plans;
pub mod admin_reports;
pub mod admin_system;
pub mod api_keys;
pub mod attempts;
pub mod auth;
pub mod billing;
pub mod credits;
pub mod me;
pub mod mfa;
pub mod ops;
pub mod pages;
pub mod plans;
pub mod ratelimit;
pub mod usage;
pub mod views;
