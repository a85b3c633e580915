//! A subscriber that records every event and span, for the tests that read
//! what the library logs. Installed as the process's global subscriber
//! (`events()`, for code that logs from whichever worker runs it: such a
//! test runs in a test file of its own) or as this thread's default
//! (`Events::on_this_thread`, for a current-thread runtime).
#![allow(dead_code, unreachable_pub)] // each test file uses a different part

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};

use tracing::Level;
use tracing::field::{Field, Visit};

/// One event.
#[derive(Clone, Debug)]
pub struct Logged {
    pub level: Level,
    pub target: String,
    /// Every field, the message among them, as `name=value ` (values as
    /// `Debug` writes them, so a string is quoted).
    pub fields: String,
    /// Every field by name: a string as it is, any other value as `Debug`
    /// writes it.
    pub values: BTreeMap<String, String>,
}

impl Logged {
    /// The field `name`, if the event has it.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// The event's message, or nothing if it has none.
    pub fn message(&self) -> &str {
        self.field("message").unwrap_or_default()
    }
}

/// What the subscriber recorded.
#[derive(Default)]
pub struct Events {
    events: Mutex<Vec<Logged>>,
    spans: Mutex<Vec<BTreeMap<String, String>>>,
}

impl Events {
    /// A subscriber that records the events logged on this thread (the
    /// whole runtime of a current-thread test) until the guard is dropped.
    pub fn on_this_thread() -> (Arc<Self>, tracing::subscriber::DefaultGuard) {
        let events = Arc::new(Self::default());
        let guard = tracing::subscriber::set_default(events.clone());
        (events, guard)
    }

    /// The events at `level` whose target starts with `target`.
    pub fn at(&self, level: Level, target: &str) -> Vec<Logged> {
        let events = self.events.lock().unwrap();
        let matching = events.iter().filter(|event| event.level == level);
        matching
            .filter(|event| event.target.starts_with(target))
            .cloned()
            .collect()
    }

    /// The messages of the events at `level` or above (more severe).
    pub fn messages_at_least(&self, level: Level) -> Vec<String> {
        let events = self.events.lock().unwrap();
        let severe = events.iter().filter(|event| event.level <= level);
        severe.map(|event| event.message().to_owned()).collect()
    }

    /// Forgets every event so far; the ones at `level` or above.
    pub fn take_at_least(&self, level: Level) -> Vec<Logged> {
        let events = std::mem::take(&mut *self.events.lock().unwrap());
        events
            .into_iter()
            .filter(|event| event.level <= level)
            .collect()
    }

    /// Every event not taken yet and every span's fields, as text.
    pub fn everything(&self) -> String {
        let events = self.events.lock().unwrap();
        format!("{:?} {:?}", events, self.spans.lock().unwrap())
    }
}

#[derive(Default)]
struct Fields {
    text: String,
    values: BTreeMap<String, String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.text, "{}={value:?} ", field.name());
        self.values
            .insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let value = format!("{value:?}");
        let _ = write!(self.text, "{}={value} ", field.name());
        self.values.insert(field.name().to_owned(), value);
    }
}

impl tracing::Subscriber for Events {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut fields = Fields::default();
        span.record(&mut fields);
        let mut spans = self.spans.lock().unwrap();
        spans.push(fields.values);
        tracing::span::Id::from_u64(spans.len() as u64)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let metadata = event.metadata();
        self.events.lock().unwrap().push(Logged {
            level: *metadata.level(),
            target: metadata.target().to_owned(),
            fields: fields.text,
            values: fields.values,
        });
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The process's global subscriber, installed by the first call.
pub fn events() -> Arc<Events> {
    static EVENTS: OnceLock<Arc<Events>> = OnceLock::new();
    EVENTS
        .get_or_init(|| {
            let events = Arc::new(Events::default());
            tracing::subscriber::set_global_default(events.clone()).expect("the only subscriber");
            events
        })
        .clone()
}
