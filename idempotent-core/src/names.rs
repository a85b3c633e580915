//! Handlers that share a default endpoint name.
//!
//! The endpoint's name is its identity in every fingerprint, and the
//! attribute's default is the function's path, `module_path!()::function`.
//! Two handlers the attribute cannot tell apart by path (associated
//! functions of two types in one module, local functions of one name in
//! two functions) would share it, and a key reused from one at the other
//! with an equal payload would be answered with the other's stored
//! response. Each handler named by default registers on its first request
//! with a `static` of its own, whose address tells it apart from every
//! other handler (even two that one `macro_rules!` invocation writes
//! token for token alike, which stand at one place and read items of
//! their own through the same names); once two handlers have registered
//! one name, both answer 500 and the log names where their attributes
//! stand, until one of them is given a `name`.
//!
//! An explicit `name` is never checked: giving two handlers one name on
//! purpose (an old and a new version of one endpoint) makes them one
//! endpoint.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock, PoisonError};

use crate::fingerprint::FingerprintError;

/// Which handler first registered each default name, and the names two
/// handlers registered.
#[derive(Default)]
struct Registry {
    /// The first handler of each name: its [`DefaultName`]'s address,
    /// which is its identity, and its place, which the log shows.
    first: HashMap<&'static str, (usize, &'static str)>,
    shared: HashMap<&'static str, [&'static str; 2]>,
    /// The exact-repeat ids ([`endpoint_id`](crate::__private::endpoint_id))
    /// of the handlers whose name is shared.
    shared_endpoints: HashSet<u64>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Mutex::default);
/// Set once any name is shared, so that every other request pays one
/// relaxed load and no lock.
static ANY_SHARED: AtomicBool = AtomicBool::new(false);

/// A handler's default endpoint name and the place of its attribute
/// (`file:line:column #hash`, the hash that of the handler as written).
/// Each handler has one `static` of its own: its address is the
/// handler's identity, the place only what the log shows.
#[derive(Debug)]
pub struct DefaultName {
    place: &'static str,
    registered: OnceLock<()>,
}

impl DefaultName {
    /// The name registered by the attribute at `place`.
    #[must_use]
    pub const fn new(place: &'static str) -> Self {
        Self {
            place,
            registered: OnceLock::new(),
        }
    }

    /// `Ok` unless another handler's attribute has registered `name` too.
    /// Each handler checks through a `static` of its own: another
    /// `DefaultName` is another handler, even at the same place.
    ///
    /// # Errors
    /// [`FingerprintError::SharedEndpointName`] with both places.
    pub fn check(&self, name: &'static str) -> Result<(), FingerprintError> {
        let handler = std::ptr::from_ref(self).addr();
        self.registered
            .get_or_init(|| register(name, handler, self.place));
        if !ANY_SHARED.load(Ordering::Relaxed) {
            return Ok(());
        }
        let registry = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
        match registry.shared.get(name) {
            Some(&places) => Err(FingerprintError::SharedEndpointName { name, places }),
            None => Ok(()),
        }
    }
}

fn register(name: &'static str, handler: usize, place: &'static str) {
    let mut registry = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
    let (first_handler, first) = *registry.first.entry(name).or_insert((handler, place));
    if first_handler != handler {
        registry.shared.insert(name, [first, place]);
        for place in [first, place] {
            let id = crate::__private::endpoint_id(name, place);
            registry.shared_endpoints.insert(id);
        }
        ANY_SHARED.store(true, Ordering::Relaxed);
    }
}

/// Whether the handler with exact-repeat id `endpoint` shares its default
/// name with another one: its requests are then refused as the full path
/// refuses them, so none may be answered as an exact repeat.
pub(crate) fn shares_default_name(endpoint: u64) -> bool {
    if !ANY_SHARED.load(Ordering::Relaxed) {
        return false;
    }
    let registry = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
    registry.shared_endpoints.contains(&endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_handler_may_check_its_name_any_number_of_times() {
        static CREATE: DefaultName = DefaultName::new("src/orders.rs:10:5");
        for _ in 0..3 {
            assert!(CREATE.check("app::orders::create").is_ok());
        }
    }

    /// Two handlers that one `macro_rules!` invocation writes alike stand
    /// at one place, yet each has a `static` of its own.
    #[test]
    fn two_handlers_at_one_place_are_two_handlers() {
        static DEPOSIT: DefaultName = DefaultName::new("src/ledgers.rs:30:1 #0badcafe");
        static WITHDRAWAL: DefaultName = DefaultName::new("src/ledgers.rs:30:1 #0badcafe");
        let name = "app::ledgers::book";
        assert!(DEPOSIT.check(name).is_ok());
        assert!(WITHDRAWAL.check(name).is_err());
        assert!(DEPOSIT.check(name).is_err(), "the first one is refused too");
    }

    #[test]
    fn a_name_registered_at_two_places_is_refused_at_both() {
        let orders = DefaultName::new("src/api.rs:10:5");
        let refunds = DefaultName::new("src/api.rs:20:5");
        let name = "app::api::create";
        assert!(orders.check(name).is_ok());
        let Err(FingerprintError::SharedEndpointName { places, .. }) = refunds.check(name) else {
            panic!("the second place was accepted");
        };
        assert_eq!(places, ["src/api.rs:10:5", "src/api.rs:20:5"]);
        assert!(orders.check(name).is_err(), "the first place still serves");
        assert!(
            DefaultName::new("src/api.rs:30:5")
                .check("app::api::other")
                .is_ok()
        );
    }
}
