//! Berth: an OCI container image registry.
//!
//! Data flows one way: `api` (HTTP only) calls `service` (the registry's rules), which calls
//! `storage` (blob bytes by digest) and `metadata` (the transactional source of truth for
//! everything that is not blob bytes). Nothing below `api` knows about HTTP.
//!
//! - [`config`]: one serde config, validated into [`config::Config`] that the server trusts.
//! - [`logging`]: stderr, with the access log's lines buffered (see its doc).
//! - [`server`]: serves the API on an already-bound listener; limits; graceful shutdown.
//! - [`tls`]: the certificate (reloaded when its files change) and client-certificate check.
//! - [`api`]: route parsing into a typed enum, one handler module per endpoint family, and the
//!   one table of spec error codes; the management API (`/api/v1`) with its route table.
//! - [`auth`]: accounts, credentials, registry tokens and rights (who may do what).
//! - [`service`]: pushes, pulls, deletes, uploads, referrers; background upload expiry.
//! - [`storage`]: the [`storage::BlobStore`] trait and its filesystem implementation.
//! - [`metadata`]: [`metadata::Metadata`], one SQL layer over SQLite and PostgreSQL.
//! - [`webhooks`]: subscriptions to the event log, delivered as signed CloudEvents by a
//!   background worker.
//! - [`metrics`]: [`metrics::Metrics`], the Prometheus metrics every layer records into.
//! - [`otel`]: OpenTelemetry export of the request spans (the `otel` feature).

pub mod api;
pub mod audit;
pub mod auth;
pub mod config;
pub mod logging;
pub mod metadata;
pub mod metrics;
pub mod otel;
pub mod server;
pub mod service;
pub mod storage;
pub mod time;
pub mod tls;
pub mod webhooks;
