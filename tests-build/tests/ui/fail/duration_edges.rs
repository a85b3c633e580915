use idempotent_core::idempotent;

#[idempotent(ttl = "-5s")]
async fn negative() {}

#[idempotent(ttl = "")]
async fn empty() {}

#[idempotent(ttl = "99999999999999999999d")]
async fn overflowing() {}

#[idempotent(wait = "0ms")]
async fn zero_wait() {}

#[idempotent(ttl = "1h,30m")]
async fn comma() {}

fn main() {}
