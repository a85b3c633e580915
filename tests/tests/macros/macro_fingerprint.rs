//! What the typed fingerprint of an `#[idempotent]` handler tells apart,
//! through a `Router`: a retry of the same request is replayed, and a key
//! reused with arguments the handler would see differently is refused
//! with 422, never answered with another request's response.

use crate::macro_support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::extract::{Path, Query, RawForm, RawQuery, State};
use axum::http::{Request, StatusCode};
use axum::response::Response;
use axum::routing::{MethodRouter, post};
use axum::{Form, Json, Router};
use axum_extra::extract::WithRejection;
use http_body_util::BodyExt;
use idempotent_core::store::MemoryStore;
use idempotent_core::{IDEMPOTENT_REPLAYED, Idempotency, idempotent};
use macro_support::ApiError;
use serde::{Deserialize, Serialize};
use tower::ServiceExt;

#[derive(Serialize, Deserialize)]
struct Charge {
    amount: f64,
}

/// Renders the amount as the handler sees it, sign of a zero included.
#[idempotent(scope = "global")]
async fn charge(Json(charge): Json<Charge>) -> String {
    format!("charged {}", charge.amount)
}

/// Two arguments whose raw text could run together.
#[idempotent(scope = "global")]
async fn split(Path(head): Path<String>, tail: String) -> String {
    format!("{head}|{tail}")
}

/// Query pairs in the order the client sent them, repeats kept.
#[idempotent(scope = "global")]
async fn tags(Query(pairs): Query<Vec<(String, String)>>) -> String {
    format!("{pairs:?}")
}

/// A query read as a map: order is not part of what the handler sees.
#[idempotent(scope = "global")]
async fn filters(Query(filters): Query<HashMap<String, String>>) -> String {
    let mut filters: Vec<_> = filters.into_iter().collect();
    filters.sort();
    format!("{filters:?}")
}

/// A form read as a map.
#[idempotent(scope = "global")]
async fn form_map(Form(fields): Form<HashMap<String, String>>) -> String {
    format!("{} fields", fields.len())
}

/// A JSON body that is a `HashMap`, iterated in its hash order.
#[idempotent(scope = "global")]
async fn limits(Json(limits): Json<HashMap<String, u64>>) -> String {
    format!("{} limits", limits.len())
}

#[derive(Serialize, Deserialize)]
struct Labels {
    labels: HashSet<String>,
}

/// A JSON body holding a `HashSet`, which each parse builds with keys of
/// its own, and so iterates in an order of its own.
#[idempotent(scope = "global")]
async fn labels(Json(labels): Json<Labels>) -> String {
    format!("{} labels", labels.labels.len())
}

/// Who a message goes to: everyone, or a set of names, told apart by
/// their JSON shape alone.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Recipients {
    Everyone(bool),
    Listed(HashSet<String>),
}

#[derive(Serialize, Deserialize)]
struct Message {
    to: Recipients,
}

/// A JSON body holding a `HashSet` as an untagged enum's variant, which
/// serde serializes without passing on the set's type.
#[idempotent(scope = "global")]
async fn message(Json(message): Json<Message>) -> String {
    match message.to {
        Recipients::Everyone(all) => format!("to everyone: {all}"),
        Recipients::Listed(names) => format!("to {} recipients", names.len()),
    }
}

/// Account ids the body lists as numbers and the payload writes as
/// strings, handing its set to serde as an iterator, mapped item by item:
/// as `serde_with` writes `#[serde_as(as = "HashSet<DisplayFromStr>")]`.
#[derive(Serialize, Deserialize)]
struct Grant {
    #[serde(serialize_with = "as_strings")]
    accounts: HashSet<u64>,
}

fn as_strings<S: serde::Serializer>(
    accounts: &HashSet<u64>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(accounts.iter().map(ToString::to_string))
}

#[idempotent(scope = "global")]
async fn grant(Json(grant): Json<Grant>) -> String {
    format!("{} accounts", grant.accounts.len())
}

/// A payload whose `Serialize` refuses some values the body can carry.
#[derive(Deserialize)]
struct Note {
    text: String,
}

impl Serialize for Note {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.text.is_empty() {
            return Err(serde::ser::Error::custom("an empty note has no form"));
        }
        serializer.serialize_str(&self.text)
    }
}

#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

#[idempotent(scope = "global")]
async fn note(State(runs): State<Runs>, Json(note): Json<Note>) -> String {
    runs.0.fetch_add(1, Ordering::SeqCst);
    format!("noted {}", note.text)
}

/// A JSON body whose rejection the application answers itself.
#[idempotent(scope = "global")]
async fn charge_with_rejection(
    WithRejection(Json(charge), _): WithRejection<Json<Charge>, ApiError>,
) -> String {
    format!("charged {}", charge.amount)
}

/// axum-extra's query, which reads repeated keys into a `Vec`.
#[idempotent(scope = "global")]
async fn extra_query(
    axum_extra::extract::Query(filters): axum_extra::extract::Query<HashMap<String, Vec<String>>>,
) -> String {
    format!("{} filters", filters.len())
}

/// axum-extra's form.
#[idempotent(scope = "global")]
async fn extra_form(
    axum_extra::extract::Form(fields): axum_extra::extract::Form<HashMap<String, String>>,
) -> String {
    format!("{} fields", fields.len())
}

/// The query string as sent.
#[idempotent(scope = "global")]
async fn raw_query(RawQuery(query): RawQuery) -> String {
    format!("{query:?}")
}

/// The form body as sent.
#[idempotent(scope = "global")]
async fn raw_form(RawForm(form): RawForm) -> String {
    format!("{} bytes", form.len())
}

/// Whether the order is only checked, not placed.
#[derive(Serialize, Deserialize)]
struct DryRun {
    dry_run: bool,
}

/// A payment as one release reads it.
#[derive(Serialize, Deserialize)]
struct Payment {
    amount: u64,
}

/// The same payment as the next release reads it: an optional field more,
/// which clients of the earlier release do not send.
#[derive(Serialize, Deserialize)]
struct PaymentWithMemo {
    amount: u64,
    memo: Option<String>,
}

#[idempotent(scope = "global", name = "payments.create")]
async fn pay(Json(payment): Json<Payment>) -> String {
    format!("paid {}", payment.amount)
}

/// `pay` once the release that added the memo is deployed.
#[idempotent(scope = "global", name = "payments.create")]
async fn pay_with_memo(Json(payment): Json<PaymentWithMemo>) -> String {
    format!("paid {} {:?}", payment.amount, payment.memo)
}

/// Extractors taken one by one, under the endpoint name that
/// `grouped_order` shares.
#[idempotent(scope = "global", name = "orders.grouped")]
async fn separate_order(
    Path(id): Path<u32>,
    Query(page): Query<DryRun>,
    Json(charge): Json<Charge>,
) -> String {
    format!("order {id} {} {}", page.dry_run, charge.amount)
}

/// The same extractors grouped into a tuple, as a handler past axum's
/// limit of arguments groups them: each is fingerprinted as it would be as
/// an argument of its own, and in the same order.
#[idempotent(scope = "global", name = "orders.grouped")]
async fn grouped_order(
    (Path(id), Query(page)): (Path<u32>, Query<DryRun>),
    Json(charge): Json<Charge>,
) -> String {
    format!("order {id} {} {}", page.dry_run, charge.amount)
}

/// In a tuple as in the arguments, an extractor that carries no payload
/// is left out, and so is one bound to `_`, which the handler never reads.
#[idempotent(scope = "global")]
async fn grouped_metadata(
    (method, _): (axum::http::Method, Query<DryRun>),
    body: String,
) -> String {
    format!("{method} {body}")
}

/// An extractor that `..` passes over is bound by nothing, so the
/// handler never reads it: it is left out, as one bound to `_` is.
#[idempotent(scope = "global")]
async fn grouped_passed_over((Path(id), ..): (Path<u32>, Query<DryRun>), body: String) -> String {
    format!("order {id} {body}")
}

/// A handler that a `macro_rules!` writes, given its tuple's type as a
/// `ty` fragment: syn reads that type inside invisible delimiters.
macro_rules! grouped_by_a_macro {
    ($name:ident, $grouped:ty) => {
        #[idempotent(scope = "global")]
        async fn $name((method, Query(page)): $grouped, body: String) -> String {
            format!("{method} {} {body}", page.dry_run)
        }
    };
}

grouped_by_a_macro!(grouped_through_a_macro, (axum::http::Method, Query<DryRun>));

/// Routers that one `macro_rules!` invocation writes, each with a
/// handler of one name local to its function: the handlers' tokens are
/// the same, but each reads its own function's `LABEL`.
macro_rules! ledgers {
    ($($router:ident => $label:literal),*) => {$(
        fn $router() -> Router<()> {
            const LABEL: &str = $label;
            #[idempotent(scope = "global")]
            async fn book(Json(n): Json<u32>) -> String {
                format!("{LABEL} {n}")
            }
            Router::new().route(concat!("/", $label), post(book))
        }
    )*};
}

ledgers!(deposits => "deposit", withdrawals => "withdrawal");

fn app() -> Router {
    Router::new()
        .route("/charge", post(charge))
        .route("/split/{head}", post(split))
        .route("/tags", post(tags))
        .route("/filters", post(filters))
        .route("/form", post(form_map))
        .route("/limits", post(limits))
        .route("/labels", post(labels))
        .route("/message", post(message))
        .route("/grant", post(grant))
        .route("/note", post(note))
        .route("/charge-with-rejection", post(charge_with_rejection))
        .route("/extra-query", post(extra_query))
        .route("/extra-form", post(extra_form))
        .route("/raw-query", post(raw_query))
        .route("/raw-form", post(raw_form))
        .route("/grouped/{id}", post(grouped_order))
        .route("/grouped-metadata", post(grouped_metadata))
        .route("/grouped-passed-over/{id}", post(grouped_passed_over))
        .route("/grouped-by-a-macro", post(grouped_through_a_macro))
        .with_state(Runs::default())
        .layer(Idempotency::new(MemoryStore::new()))
}

fn request(uri: &str, key: &str, content_type: &str, body: &str) -> Request<Body> {
    Request::post(uri)
        .header("content-type", content_type)
        .header("idempotency-key", key)
        .body(Body::from(body.to_owned()))
        .unwrap()
}

fn json(uri: &str, key: &str, body: &str) -> Request<Body> {
    request(uri, key, "application/json", body)
}

fn text(uri: &str, key: &str, body: &str) -> Request<Body> {
    request(uri, key, "text/plain", body)
}

fn form(uri: &str, key: &str, body: &str) -> Request<Body> {
    request(uri, key, "application/x-www-form-urlencoded", body)
}

/// How the request was answered.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// The handler ran and answered this.
    Ran(String),
    /// A stored response was replayed.
    Replayed(String),
    /// 422 `key-reused`.
    KeyReused,
}

async fn send(app: &Router, request: Request<Body>) -> Answer {
    let response: Response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8(body.to_vec()).unwrap();
    match (status, replayed) {
        (StatusCode::UNPROCESSABLE_ENTITY, false) => {
            assert!(body.contains("urn:idempotent:key-reused"), "{body}");
            Answer::KeyReused
        }
        (StatusCode::OK, false) => Answer::Ran(body),
        (StatusCode::OK, true) => Answer::Replayed(body),
        other => panic!("unexpected answer {other:?}: {body}"),
    }
}

fn ran(body: &str) -> Answer {
    Answer::Ran(body.to_owned())
}

fn replayed(body: &str) -> Answer {
    Answer::Replayed(body.to_owned())
}

#[tokio::test]
async fn a_negative_zero_is_another_amount_than_zero() {
    let app = app();
    let first = send(&app, json("/charge", "k", r#"{"amount":0.0}"#)).await;
    assert_eq!(first, ran("charged 0"));
    let signed = send(&app, json("/charge", "k", r#"{"amount":-0.0}"#)).await;
    assert_eq!(
        signed,
        Answer::KeyReused,
        "the handler would have said `charged -0`"
    );
    let spelled_otherwise = send(&app, json("/charge", "k", r#"{"amount":0e3}"#)).await;
    assert_eq!(spelled_otherwise, replayed("charged 0"));
    let fresh = send(&app, json("/charge", "k2", r#"{"amount":-0}"#)).await;
    assert_eq!(fresh, ran("charged -0"));
    let retry = send(&app, json("/charge", "k2", r#"{ "amount": -0.0 }"#)).await;
    assert_eq!(retry, replayed("charged -0"));
}

#[tokio::test]
async fn adjacent_arguments_do_not_run_together() {
    let app = app();
    assert_eq!(send(&app, text("/split/ab", "k", "c")).await, ran("ab|c"));
    assert_eq!(
        send(&app, text("/split/a", "k", "bc")).await,
        Answer::KeyReused
    );
    assert_eq!(
        send(&app, text("/split/abc", "k", "")).await,
        Answer::KeyReused
    );
    assert_eq!(
        send(&app, text("/split/ab", "k", "c")).await,
        replayed("ab|c")
    );
}

#[tokio::test]
async fn repeated_query_keys_keep_their_order() {
    let app = app();
    let first = send(&app, text("/tags?tag=a&tag=b", "k", "")).await;
    assert!(matches!(first, Answer::Ran(_)), "{first:?}");
    assert_eq!(
        send(&app, text("/tags?tag=b&tag=a", "k", "")).await,
        Answer::KeyReused
    );
    assert_eq!(
        send(&app, text("/tags?tag=a", "k", "")).await,
        Answer::KeyReused
    );
    assert_eq!(
        send(&app, text("/tags?tag=ab", "k", "")).await,
        Answer::KeyReused
    );
    let retry = send(&app, text("/tags?tag=%61&tag=b", "k", "")).await;
    assert!(matches!(retry, Answer::Replayed(_)), "{retry:?}");
}

#[tokio::test]
async fn a_query_map_matches_in_any_order_and_spelling() {
    let app = app();
    let first = send(&app, text("/filters?a=1&b=x+y", "k", "")).await;
    assert!(matches!(first, Answer::Ran(_)), "{first:?}");
    let reordered = send(&app, text("/filters?b=x%20y&a=%31", "k", "")).await;
    assert!(matches!(reordered, Answer::Replayed(_)), "{reordered:?}");
    // The last of a repeated key is the one the map keeps.
    let repeated = send(&app, text("/filters?a=0&b=x+y&a=1", "k", "")).await;
    assert!(matches!(repeated, Answer::Replayed(_)), "{repeated:?}");
    let other = send(&app, text("/filters?a=1&b=x+y&c=", "k", "")).await;
    assert_eq!(other, Answer::KeyReused);
}

#[tokio::test]
async fn a_form_map_matches_in_any_order() {
    let app = app();
    assert_eq!(
        send(&app, form("/form", "k", "a=1&b=2")).await,
        ran("2 fields")
    );
    assert_eq!(
        send(&app, form("/form", "k", "b=2&a=1")).await,
        replayed("2 fields")
    );
    assert_eq!(
        send(&app, form("/form", "k", "a=1&b=3")).await,
        Answer::KeyReused
    );
}

#[tokio::test]
async fn a_hash_map_body_matches_in_any_key_order() {
    let app = app();
    let entries: Vec<String> = (0..300).map(|i| format!("\"limit-{i}\":{i}")).collect();
    let forward = format!("{{{}}}", entries.join(","));
    let backward: Vec<&str> = entries.iter().rev().map(String::as_str).collect();
    let backward = format!("{{{}}}", backward.join(","));
    assert_eq!(
        send(&app, json("/limits", "k", &forward)).await,
        ran("300 limits")
    );
    assert_eq!(
        send(&app, json("/limits", "k", &backward)).await,
        replayed("300 limits")
    );
    let changed = forward.replace("\"limit-7\":7", "\"limit-7\":8");
    assert_eq!(
        send(&app, json("/limits", "k", &changed)).await,
        Answer::KeyReused
    );
}

#[tokio::test]
async fn a_hash_set_body_matches_in_any_order_on_every_retry() {
    let app = app();
    let labels: Vec<String> = (0..16).map(|i| format!("\"label-{i}\"")).collect();
    let body = format!(r#"{{"labels":[{}]}}"#, labels.join(","));
    assert_eq!(
        send(&app, json("/labels", "k", &body)).await,
        ran("16 labels")
    );
    // Every retry parses the body into a set that iterates in an order of
    // its own, as a retry served by another process would. Each is spaced
    // apart differently, so that none is answered as an exact repeat of
    // an earlier one, before its body is parsed.
    for spaces in 1..=8 {
        let spaced = body.replace(':', &format!(":{}", " ".repeat(spaces)));
        assert_eq!(
            send(&app, json("/labels", "k", &spaced)).await,
            replayed("16 labels")
        );
    }
    // The handler sees the same set in any order, a repeat included.
    let reordered: Vec<&str> = labels.iter().rev().map(String::as_str).collect();
    let reordered = format!(r#"{{"labels":[{},"label-0"]}}"#, reordered.join(","));
    assert_eq!(
        send(&app, json("/labels", "k", &reordered)).await,
        replayed("16 labels")
    );
    let changed = body.replace("label-7", "label-77");
    assert_eq!(
        send(&app, json("/labels", "k", &changed)).await,
        Answer::KeyReused
    );
}

/// As a set in a field, a set that an untagged enum's variant holds is
/// the same set on every retry, whatever order its parse iterates in.
#[tokio::test]
async fn a_hash_set_in_an_untagged_enum_matches_in_any_order_on_every_retry() {
    let app = app();
    let names: Vec<String> = (0..16).map(|i| format!("\"name-{i}\"")).collect();
    let body = format!(r#"{{"to":[{}]}}"#, names.join(","));
    assert_eq!(
        send(&app, json("/message", "k", &body)).await,
        ran("to 16 recipients")
    );
    // Spaced apart differently each time, so that none is answered as an
    // exact repeat of an earlier one, before its body is parsed.
    for spaces in 1..=8 {
        let spaced = body.replace(':', &format!(":{}", " ".repeat(spaces)));
        assert_eq!(
            send(&app, json("/message", "k", &spaced)).await,
            replayed("to 16 recipients"),
            "retry {spaces}"
        );
    }
    let changed = body.replace("name-7", "name-77");
    assert_eq!(
        send(&app, json("/message", "k", &changed)).await,
        Answer::KeyReused
    );
    let everyone = send(&app, json("/message", "k", r#"{"to":true}"#)).await;
    assert_eq!(everyone, Answer::KeyReused);
}

/// A set its payload hands to serde as an iterator, as `serde_with` does,
/// is the same set on every retry too, whatever order its parse iterates
/// in.
#[tokio::test]
async fn a_hash_set_written_through_its_iterator_matches_on_every_retry() {
    let app = app();
    let ids: Vec<String> = (1000..1016).map(|id: u64| id.to_string()).collect();
    let body = format!(r#"{{"accounts":[{}]}}"#, ids.join(","));
    let first = send(&app, json("/grant", "k", &body)).await;
    assert_eq!(first, ran("16 accounts"));
    // Spaced apart differently each time, so that none is answered as an
    // exact repeat of an earlier one, before its body is parsed.
    for spaces in 1..=8 {
        let spaced = body.replace(':', &format!(":{}", " ".repeat(spaces)));
        assert_eq!(
            send(&app, json("/grant", "k", &spaced)).await,
            replayed("16 accounts"),
            "retry {spaces}"
        );
    }
    let changed = body.replace("1007", "1077");
    let other = send(&app, json("/grant", "k", &changed)).await;
    assert_eq!(other, Answer::KeyReused);
}

/// Two handlers that share a default name, and even their tokens, are
/// refused, as two written apart are: neither is answered with the
/// other's stored response.
#[tokio::test]
async fn alike_handlers_of_one_macro_invocation_never_replay_each_other() {
    let app = deposits()
        .merge(withdrawals())
        .layer(Idempotency::new(MemoryStore::new()));
    let first = app
        .clone()
        .oneshot(json("/deposit", "k", "5"))
        .await
        .unwrap();
    let body = first.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "deposit 5");
    let other = app.oneshot(json("/withdrawal", "k", "5")).await.unwrap();
    let (status, replay) = (
        other.status(),
        other.headers().contains_key(IDEMPOTENT_REPLAYED),
    );
    let body = other.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        (status, replay),
        (StatusCode::INTERNAL_SERVER_ERROR, false),
        "the withdrawal was answered {body:?}"
    );
}

#[tokio::test]
async fn an_input_that_cannot_be_serialized_runs_nothing_and_claims_nothing() {
    let runs = Runs::default();
    let app = Router::new()
        .route("/note", post(note))
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    let response = app
        .clone()
        .oneshot(json("/note", "k", r#"{"text":""}"#))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8(body.to_vec()).unwrap();
    assert!(body.contains("urn:idempotent:fingerprint-failed"), "{body}");
    assert_eq!(runs.0.load(Ordering::SeqCst), 0);
    let fixed = send(&app, json("/note", "k", r#"{"text":"hi"}"#)).await;
    assert_eq!(fixed, ran("noted hi"));
    assert_eq!(runs.0.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_json_body_with_its_own_rejection_is_fingerprinted() {
    let app = app();
    let uri = "/charge-with-rejection";
    let first = send(&app, json(uri, "k", r#"{"amount":10}"#)).await;
    assert_eq!(first, ran("charged 10"));
    let other = send(&app, json(uri, "k", r#"{"amount":1000}"#)).await;
    assert_eq!(
        other,
        Answer::KeyReused,
        "the handler would have charged 1000"
    );
    let retry = send(&app, json(uri, "k", r#"{ "amount": 10 }"#)).await;
    assert_eq!(retry, replayed("charged 10"));
}

/// A body `WithRejection` refuses is answered by the application's error,
/// as a plain `Json<T>`'s rejection is answered by axum's: nothing is
/// claimed, so the retry with the body fixed runs under the same key.
#[tokio::test]
async fn a_body_with_its_own_rejection_refused_claims_nothing() {
    let app = app();
    let uri = "/charge-with-rejection";
    let malformed = app.clone().oneshot(json(uri, "k", "{")).await.unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    assert!(!malformed.headers().contains_key(IDEMPOTENT_REPLAYED));
    let fixed = send(&app, json(uri, "k", r#"{"amount":10}"#)).await;
    assert_eq!(fixed, ran("charged 10"), "the rejection was stored");
    let retry = send(&app, json(uri, "k", r#"{"amount":10}"#)).await;
    assert_eq!(retry, replayed("charged 10"));
}

#[tokio::test]
async fn axum_extra_query_and_form_are_fingerprinted() {
    let app = app();
    let first = send(&app, text("/extra-query?tag=a&tag=b", "k", "")).await;
    assert_eq!(first, ran("1 filters"));
    let other = send(&app, text("/extra-query?tag=a", "k", "")).await;
    assert_eq!(other, Answer::KeyReused);
    let retry = send(&app, text("/extra-query?tag=%61&tag=b", "k", "")).await;
    assert_eq!(retry, replayed("1 filters"));

    let first = send(&app, form("/extra-form", "k2", "a=1&b=2")).await;
    assert_eq!(first, ran("2 fields"));
    let other = send(&app, form("/extra-form", "k2", "a=1&b=3")).await;
    assert_eq!(other, Answer::KeyReused);
    let retry = send(&app, form("/extra-form", "k2", "b=2&a=1")).await;
    assert_eq!(retry, replayed("2 fields"));
}

#[tokio::test]
async fn a_raw_query_and_a_raw_form_are_fingerprinted_as_sent() {
    let app = app();
    let first = send(&app, text("/raw-query?a=1", "k", "")).await;
    assert_eq!(first, ran(r#"Some("a=1")"#));
    let other = send(&app, text("/raw-query?a=2", "k", "")).await;
    assert_eq!(other, Answer::KeyReused);
    let none = send(&app, text("/raw-query", "k", "")).await;
    assert_eq!(none, Answer::KeyReused);
    let retry = send(&app, text("/raw-query?a=1", "k", "")).await;
    assert_eq!(retry, replayed(r#"Some("a=1")"#));
    // Unlike `Query<T>`'s, the text itself: the handler reads the order.
    let first = send(&app, text("/raw-query?a=1&b=2", "k3", "")).await;
    assert_eq!(first, ran(r#"Some("a=1&b=2")"#));
    let reordered = send(&app, text("/raw-query?b=2&a=1", "k3", "")).await;
    assert_eq!(reordered, Answer::KeyReused);

    let first = send(&app, form("/raw-form", "k2", "a=1")).await;
    assert_eq!(first, ran("3 bytes"));
    let other = send(&app, form("/raw-form", "k2", "a=2")).await;
    assert_eq!(other, Answer::KeyReused);
    let retry = send(&app, form("/raw-form", "k2", "a=1")).await;
    assert_eq!(retry, replayed("3 bytes"));
}

#[tokio::test]
async fn each_extractor_grouped_in_a_tuple_is_fingerprinted() {
    let app = app();
    let uri = "/grouped/7?dry_run=false";
    let first = send(&app, json(uri, "k", r#"{"amount":10}"#)).await;
    assert_eq!(first, ran("order 7 false 10"));
    let other_query = send(
        &app,
        json("/grouped/7?dry_run=true", "k", r#"{"amount":10}"#),
    )
    .await;
    assert_eq!(
        other_query,
        Answer::KeyReused,
        "the handler would have only checked the order"
    );
    let other_body = send(&app, json(uri, "k", r#"{"amount":11}"#)).await;
    assert_eq!(other_body, Answer::KeyReused);
    let retry = send(&app, json(uri, "k", r#"{ "amount": 10 }"#)).await;
    assert_eq!(retry, replayed("order 7 false 10"));

    let uri = "/grouped-metadata?dry_run=false";
    let first = send(&app, text(uri, "k2", "a")).await;
    assert_eq!(first, ran("POST a"));
    let unread = send(&app, text("/grouped-metadata?dry_run=true", "k2", "a")).await;
    assert_eq!(unread, replayed("POST a"));
    let other = send(&app, text(uri, "k2", "b")).await;
    assert_eq!(other, Answer::KeyReused, "the body is still fingerprinted");
}

/// The routers of two releases serving `path` with `before` and `after`,
/// on one store, as a deploy rolls out.
fn releases(path: &str, before: MethodRouter, after: MethodRouter) -> (Router, Router) {
    let store = MemoryStore::new();
    let release = |route, store| {
        Router::new()
            .route(path, route)
            .layer(Idempotency::new(store))
    };
    (release(before, store.clone()), release(after, store))
}

/// Grouping extractors into a tuple keeps the fingerprints already stored:
/// a retry sent across the deploy that grouped them is still a retry.
#[tokio::test]
async fn grouping_extractors_into_a_tuple_keeps_the_fingerprint() {
    let (before, after) = releases("/orders/{id}", post(separate_order), post(grouped_order));
    let uri = "/orders/7?dry_run=false";
    let first = send(&before, json(uri, "k", r#"{"amount":10}"#)).await;
    assert_eq!(first, ran("order 7 false 10"));
    let retry = send(&after, json(uri, "k", r#"{"amount":10}"#)).await;
    assert_eq!(retry, replayed("order 7 false 10"));
    let other = send(&after, json(uri, "k", r#"{"amount":11}"#)).await;
    assert_eq!(other, Answer::KeyReused);
}

/// A release that adds an optional field to the payload keeps the
/// fingerprints already stored: a retry of the same body, sent across the
/// deploy, is a retry of the same request to the handler, and is replayed
/// rather than refused as a key reused for another payload.
#[tokio::test]
async fn an_optional_field_added_to_the_payload_keeps_the_fingerprint() {
    let (before, after) = releases("/payments", post(pay), post(pay_with_memo));
    let uri = "/payments";
    let first = send(&before, json(uri, "k", r#"{"amount":10}"#)).await;
    assert_eq!(first, ran("paid 10"));
    let retry = send(&after, json(uri, "k", r#"{"amount":10}"#)).await;
    assert_eq!(
        retry,
        replayed("paid 10"),
        "the same body, sent across the deploy"
    );
    let with_memo = send(&after, json(uri, "k", r#"{"amount":10,"memo":"rent"}"#)).await;
    assert_eq!(
        with_memo,
        Answer::KeyReused,
        "the memo is part of the payload"
    );
    let explicit_null = send(&after, json(uri, "k", r#"{"amount":10,"memo":null}"#)).await;
    assert_eq!(
        explicit_null,
        replayed("paid 10"),
        "the handler reads no memo"
    );
}

#[tokio::test]
async fn an_extractor_passed_over_by_a_rest_pattern_is_left_out() {
    let app = app();
    let first = send(&app, text("/grouped-passed-over/7?dry_run=false", "k", "a")).await;
    assert_eq!(first, ran("order 7 a"));
    let unread = send(&app, text("/grouped-passed-over/7?dry_run=true", "k", "a")).await;
    assert_eq!(unread, replayed("order 7 a"), "the query is never read");
    let other = send(&app, text("/grouped-passed-over/7?dry_run=false", "k", "b")).await;
    assert_eq!(other, Answer::KeyReused, "the body is still fingerprinted");
}

#[tokio::test]
async fn a_tuple_type_a_macro_passes_in_is_fingerprinted_element_by_element() {
    let app = app();
    let uri = "/grouped-by-a-macro?dry_run=false";
    let first = send(&app, text(uri, "k", "a")).await;
    assert_eq!(first, ran("POST false a"));
    let other_query = send(&app, text("/grouped-by-a-macro?dry_run=true", "k", "a")).await;
    assert_eq!(other_query, Answer::KeyReused);
    let retry = send(&app, text(uri, "k", "a")).await;
    assert_eq!(retry, replayed("POST false a"));
}
