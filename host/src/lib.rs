//! # vllm-router
//!
//! An OpenAI-compatible HTTP router in front of vLLM workers. The host (this crate) does
//! HTTP/SSE forwarding, health checks, retries and metrics; the load-balancing decision
//! is made by a WebAssembly component implementing `wit/policy.wit`.
//!
//! Modules, one concern each: [`config`] (flags), [`server`] (routes, errors),
//! [`proxy`] (forwarding core: retries, streaming, request ids), [`workers`] (registry,
//! health state, in-flight), [`health`] (active probes), [`engine`] (vLLM engine-load scraping), [`policy`] (wasmtime engine,
//! built-ins, slots, A/B and shadow, fallback), [`watch`] (hot swap on file change),
//! [`admin`] (authenticated admin API), [`metrics`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod breaker;
pub mod config;
pub mod discovery;
pub mod engine;
pub mod error;
pub mod health;
pub mod metrics;
pub mod pd;
pub mod policy;
pub mod proxy;
pub mod request;
pub mod server;
pub mod util;
pub mod watch;
pub mod workers;
