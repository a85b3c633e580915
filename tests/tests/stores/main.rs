//! The stores against real servers and files: the contract on each, their
//! setup going wrong, races with other connections, SQL tables changed under
//! them, Redis at its limits and through a failover, the tiered cache.
//!
//! One test binary of several files (each a module below): every binary
//! links the whole dependency tree, so files that need no process of their
//! own share one.

#[path = "../macro_support/mod.rs"]
mod macro_support;
#[path = "../store_support/mod.rs"]
mod store_support;

mod store_memory;
mod store_misconfigured;
mod store_misconfigured_http;
mod store_model;
mod store_postgres;
mod store_postgres_partitions;
mod store_postgres_roles;
mod store_redis;
mod store_redis_failover;
mod store_redis_limits;
mod store_sql_altered;
mod store_sql_keys;
mod store_sql_races;
mod store_sql_tables;
mod store_sql_warnings;
mod store_sqlite;
mod store_tiered;
mod store_tiered_cut_short;
mod store_tiered_storing_later;
