use idempotent_core::idempotent;

#[idempotent(ttl = "1000000d")]
async fn too_long() {}

#[idempotent(ttl = "1.5h")]
async fn fraction() {}

#[idempotent(ttl = "24H")]
async fn capital_unit() {}

#[idempotent(lease = "5min")]
async fn spelled_out_unit() {}

#[idempotent(wait = "10")]
async fn no_unit() {}

#[idempotent(ttl = "1M")]
async fn months() {}

#[idempotent(ttl = "2w")]
async fn weeks() {}

#[idempotent(ttl = 24)]
async fn number() {}

#[idempotent(lease = true)]
async fn boolean() {}

#[idempotent(ttl)]
async fn no_value() {}

fn main() {}
