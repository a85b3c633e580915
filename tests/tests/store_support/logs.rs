//! Events at `INFO` and above, recorded through the process's one
//! subscriber: the stores log from whichever worker runs their statements
//! and background work, so a test that reads their events installs a
//! global subscriber, and runs in a test file of its own.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};

use tracing::Level;
use tracing::field::{Field, Visit};

/// An event at `INFO` or above.
#[derive(Clone, Debug)]
pub struct Logged {
    pub level: Level,
    pub target: String,
    /// Every field, the message among them, as `name=value` (values as
    /// `Debug` writes them).
    pub fields: String,
}

/// What the subscriber recorded.
#[derive(Default)]
pub struct Events(Mutex<Vec<Logged>>);

impl Events {
    /// The events at `level` whose target starts with `target`.
    pub fn at(&self, level: Level, target: &str) -> Vec<Logged> {
        let events = self.0.lock().unwrap();
        let matching = events.iter().filter(|event| event.level == level);
        matching
            .filter(|event| event.target.starts_with(target))
            .cloned()
            .collect()
    }
}

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={value:?} ", field.name());
    }
}

impl tracing::Subscriber for Events {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= Level::INFO
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let metadata = event.metadata();
        self.0.lock().unwrap().push(Logged {
            level: *metadata.level(),
            target: metadata.target().to_owned(),
            fields: fields.0,
        });
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The process's one subscriber, installed by the first call.
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
