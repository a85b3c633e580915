//! Parses and validates the attribute's options. Every problem becomes a
//! `syn::Error` spanned at the offending token; parsing goes on after an
//! error so that all of them are reported at once.

use proc_macro2::TokenStream;
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Expr, ExprLit, Ident, Lit, LitStr, Meta, MetaNameValue, Path, Token, Type};

/// The options that take a duration.
const DURATIONS: [&str; 3] = ["ttl", "lease", "wait"];

const OPTIONS: [&str; 10] = [
    "ttl",
    "lease",
    "wait",
    "scope",
    "optional",
    "skip",
    "name",
    "final_statuses",
    "exact_repeats",
    "crate",
];

/// Collects errors so the expansion can report every one of them.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(first) => first.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub(crate) fn spanned(
        &mut self,
        tokens: impl quote::ToTokens,
        message: impl std::fmt::Display,
    ) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub(crate) fn into_error(self) -> Option<syn::Error> {
        self.0
    }
}

/// Whose key it is.
pub(crate) enum Scope {
    ApiKey,
    Global,
    /// A lowercase header name.
    Header(String),
    /// A user type implementing `IdempotencyScope`.
    Custom(Path),
}

/// The validated options. Durations are in milliseconds.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) ttl: Option<u64>,
    pub(crate) lease: Option<u64>,
    pub(crate) wait: Option<u64>,
    pub(crate) scope: Option<Scope>,
    pub(crate) optional: bool,
    pub(crate) skip: Vec<Ident>,
    pub(crate) name: Option<LitStr>,
    pub(crate) final_statuses: Option<StatusList>,
    /// `exact_repeats` as written, with the option's path for errors.
    pub(crate) exact_repeats: Option<(bool, Path)>,
    /// `crate` as written; see [`Args::private`].
    krate: Option<Path>,
}

impl Args {
    /// The path of `idempotent_core`'s hidden module that expanded code
    /// calls into: under `crate` when given (for a crate that re-exports
    /// `idempotent_core` under another name), else `::idempotent_core`.
    pub(crate) fn private(&self) -> TokenStream {
        match &self.krate {
            Some(krate) => quote::quote!(#krate::__private),
            None => quote::quote!(::idempotent_core::__private),
        }
    }

    /// The principal type of a custom scope, if the scope is one.
    pub(crate) fn principal(&self) -> Option<&Path> {
        match &self.scope {
            Some(Scope::Custom(path)) => Some(path),
            _ => None,
        }
    }

    /// Parses the attribute's arguments, recording every error in `errors`.
    pub(crate) fn parse(tokens: TokenStream, errors: &mut Errors) -> Self {
        let parser = Punctuated::<WrittenOption, Token![,]>::parse_terminated;
        let options = match syn::parse::Parser::parse2(parser, tokens) {
            Ok(options) => options,
            Err(error) => {
                errors.push(error);
                return Self::default();
            }
        };
        let mut args = Self::default();
        let mut seen: Vec<String> = Vec::new();
        for option in options {
            if let Some(error) = option.missing_equals {
                errors.push(error);
            }
            let meta = match option.option.0 {
                Ok(meta) => meta,
                Err(error) => {
                    errors.push(error);
                    continue;
                }
            };
            let key = option_name(meta.path());
            if seen.contains(&key) {
                errors.spanned(meta.path(), given_twice(&key));
                continue;
            }
            seen.push(key.clone());
            if let Err(error) = args.apply(&key, &meta, errors) {
                errors.push(error);
            }
        }
        args
    }

    fn apply(&mut self, key: &str, meta: &Meta, errors: &mut Errors) -> syn::Result<()> {
        match key {
            "ttl" => self.ttl = Some(at_least_a_second(&string_value(meta)?, TTL_TOO_SHORT)?),
            "lease" => {
                self.lease = Some(at_least_a_second(&string_value(meta)?, LEASE_TOO_SHORT)?);
            }
            "wait" => self.wait = Some(wait_millis(&string_value(meta)?)?),
            "scope" => self.scope = Some(scope(name_value(meta)?)?),
            "optional" => self.optional = flag(meta)?,
            "skip" => self.skip = skip_list(meta, errors)?,
            "name" => self.name = Some(endpoint_name(string_value(meta)?)?),
            "final_statuses" => {
                self.final_statuses = Some(status_list(&string_value(meta)?)?);
            }
            "exact_repeats" => self.exact_repeats = Some((flag(meta)?, meta.path().clone())),
            "crate" => self.krate = Some(crate_path(name_value(meta)?)?),
            _ => return Err(syn::Error::new_spanned(meta.path(), unknown_option(key))),
        }
        Ok(())
    }
}

/// An option as written: `name = value`, or with its `=` written as `:`
/// or left out (`ttl: "24h"`, `ttl "24h"`), which is an error of its own;
/// the option is then read as if the `=` were there, so that its value is
/// checked too and the options after it are read (syn alone would say
/// "expected `,`" and read no further).
struct WrittenOption {
    option: AttrOption,
    missing_equals: Option<syn::Error>,
}

impl Parse for WrittenOption {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let Some((error, rewritten)) = without_equals(input) else {
            return Ok(Self {
                option: input.parse()?,
                missing_equals: None,
            });
        };
        // The tokens are the user's, so an error in them is still theirs.
        let option = syn::parse2(rewritten).unwrap_or_else(|error| AttrOption(Err(error)));
        Ok(Self {
            option,
            missing_equals: Some(error),
        })
    }
}

/// `name: value` or `name value`, consumed from `input` when the value is
/// one expression or type followed by a `,` or the end: the error about
/// the missing `=`, and the option written with it.
fn without_equals(input: ParseStream<'_>) -> Option<(syn::Error, TokenStream)> {
    let fork = input.fork();
    let name = fork.call(Ident::parse_any).ok()?;
    let colon = if fork.peek(Token![:]) && !fork.peek(Token![::]) {
        Some(fork.parse::<Token![:]>().ok()?)
    } else if fork.peek(Lit) {
        None
    } else {
        return None;
    };
    let value = option_value(&fork)?;
    syn::parse::discouraged::Speculative::advance_to(input, &fork);
    let key = name.to_string();
    let fixed = written_with_equals(&key, &value);
    let error = match colon {
        Some(colon) => colon_error(colon, &fixed),
        None => syn::Error::new_spanned(
            quote::quote!(#name #value),
            format!("expected `=` between `{key}` and its value: write {fixed}"),
        ),
    };
    let eq_token = Token![=](colon.map_or_else(|| name.span(), |colon| colon.span));
    Some((error, quote::quote!(#name #eq_token #value)))
}

/// The option `key`, written with its `=` and the user's own `value` when
/// that is a literal of the kind the option takes (`ttl = "2h"`): the
/// example's value would change what the user meant. Any other value (a
/// path, which tokens print spaced out, or a literal of the wrong kind,
/// which has an error of its own) gets the option's usual forms.
fn written_with_equals(key: &str, value: &TokenStream) -> String {
    let takes_bool = matches!(key, "optional" | "exact_repeats");
    match syn::parse2::<Lit>(value.clone()) {
        Ok(Lit::Bool(_)) if takes_bool => format!("`{key} = {value}`"),
        Ok(Lit::Str(_)) if !takes_bool && key != "skip" => format!("`{key} = {value}`"),
        _ => value_form(key),
    }
}

/// The value of an option, consumed from `input` if it is one expression
/// or type (`Extension<User>` is not an expression) followed by a `,` or
/// the end.
fn option_value(input: ParseStream<'_>) -> Option<TokenStream> {
    let ends = |fork: ParseStream<'_>| fork.is_empty() || fork.peek(Token![,]);
    let expr = input.fork();
    if let Ok(value) = expr.parse::<Expr>()
        && ends(&expr)
    {
        syn::parse::discouraged::Speculative::advance_to(input, &expr);
        return Some(value.into_token_stream());
    }
    let ty = input.fork();
    if let Ok(value) = ty.parse::<Type>()
        && ends(&ty)
    {
        syn::parse::discouraged::Speculative::advance_to(input, &ty);
        return Some(value.into_token_stream());
    }
    None
}

/// One option, as a `Meta`. A type is not an expression (`Extension<User>`
/// would read as two comparisons), so `scope = <type>` is parsed as a type
/// and carried verbatim for [`scope`] to read back. An option whose value
/// is missing (`ttl = ,`) is an error of its own, which does not stop the
/// options after it from being read.
struct AttrOption(syn::Result<Meta>);

impl Parse for AttrOption {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        if input.peek(Lit) {
            return Ok(Self(Err(value_without_name(input))));
        }
        if input.peek(Ident) && input.peek2(Token![:]) && !input.peek2(Token![::]) {
            return Err(colon_instead_of_equals(input));
        }
        if let Some(error) = missing_value(input) {
            return Ok(Self(Err(error)));
        }
        if input.peek(Ident) && input.peek2(Token![=]) && !input.peek3(Lit) {
            let fork = input.fork();
            let path: Path = fork.parse()?;
            let eq_token: Token![=] = fork.parse()?;
            if path.is_ident("scope")
                && let Ok(ty) = fork.parse::<Type>()
                && (fork.is_empty() || fork.peek(Token![,]))
            {
                syn::parse::discouraged::Speculative::advance_to(input, &fork);
                let value = Expr::Verbatim(ungrouped_type(ty).into_token_stream());
                return Ok(Self(Ok(Meta::NameValue(MetaNameValue {
                    path,
                    eq_token,
                    value,
                }))));
            }
        }
        let meta = ungrouped_value(input.parse()?);
        if let Some(error) = unquoted_duration(&meta, input) {
            return Ok(Self(Err(error)));
        }
        Ok(Self(Ok(meta)))
    }
}

/// `meta` with its value read out of the invisible delimiters around a
/// fragment that a `macro_rules!` passed in (`ttl = $ttl`, with `$ttl` an
/// `expr` or a `literal`): syn keeps them as an `Expr::Group`, which would
/// otherwise be refused as no literal, though the literal is right there.
fn ungrouped_value(meta: Meta) -> Meta {
    match meta {
        Meta::NameValue(mut option) => {
            while let Expr::Group(group) = option.value {
                option.value = *group.expr;
            }
            Meta::NameValue(option)
        }
        other => other,
    }
}

/// `ty` read out of the invisible delimiters around a fragment that a
/// `macro_rules!` passed in (`scope = $user`, with `$user` a `ty` or a
/// `path`), which syn keeps as a `Type::Group`.
fn ungrouped_type(mut ty: Type) -> Type {
    while let Type::Group(group) = ty {
        ty = *group.elem;
    }
    ty
}

/// A duration written without its quotes: `24h` lexes as the integer 24
/// with the suffix `h`, and `1h 30m` as two such literals, whose second
/// syn alone would meet with "expected `,`". The literals that follow
/// the first are consumed, so the options after them are still read.
fn unquoted_duration(meta: &Meta, input: ParseStream<'_>) -> Option<syn::Error> {
    let Meta::NameValue(MetaNameValue {
        path,
        value: Expr::Lit(ExprLit { lit: first, .. }),
        ..
    }) = meta
    else {
        return None;
    };
    // `1.5h` is left to the error about a string: quoted, it would still
    // be refused, as a duration takes whole numbers.
    let has_suffix = matches!(first, Lit::Int(int) if !int.suffix().is_empty());
    let key = option_name(path);
    if !has_suffix || !DURATIONS.contains(&key.as_str()) {
        return None;
    }
    let mut terms = vec![first.clone()];
    while input.peek(syn::LitInt) {
        terms.push(input.parse().ok()?);
    }
    let written: Vec<String> = terms
        .iter()
        .map(|term| term.to_token_stream().to_string())
        .collect();
    let message = format!(
        "a duration is a string: write `{key} = \"{}\"`",
        written.join(" ")
    );
    let last = terms.last().unwrap_or(first);
    Some(syn::Error::new_spanned(
        quote::quote!(#first #last),
        message,
    ))
}

/// A value written without its option's name (`#[idempotent("24h")]`, as
/// if options were positional), consumed with the literals right after it
/// (`24h 30m`): syn alone would say "expected identifier", which names
/// neither the option nor the fix. The option is named when the value can
/// only be one option's.
fn value_without_name(input: ParseStream<'_>) -> syn::Error {
    let mut literals: Vec<Lit> = Vec::new();
    while input.peek(Lit) {
        match input.parse() {
            Ok(lit) => literals.push(lit),
            Err(error) => return error,
        }
    }
    let message = match option_for(&literals) {
        Some(fix) => format!("options are written with their name: write {fix}"),
        None => format!(
            "options are written with their name, as `name = value`: the options are {}",
            listed(&OPTIONS)
        ),
    };
    let (first, last) = (literals.first(), literals.last());
    syn::Error::new_spanned(quote::quote!(#first #last), message)
}

/// The option whose value `literals` (written in a row, without a name)
/// can only be, written with its name and that value.
fn option_for(literals: &[Lit]) -> Option<String> {
    match literals {
        [Lit::Str(text)] => {
            let key = if parse_duration(&text.value()).is_ok() {
                "ttl"
            } else if named_scope(text).is_ok() {
                "scope"
            } else if status_list(text).is_ok() {
                "final_statuses"
            } else {
                return None;
            };
            let also = if key == "ttl" { DURATIONS_TOO } else { "" };
            Some(format!("`{key} = {}`{also}", text.token()))
        }
        // `24h` lexes as the integer 24 with the suffix `h`, and `1h 30m`
        // as two such integers.
        [Lit::Int(first), ..] if !first.suffix().is_empty() => {
            let written: Vec<String> = literals
                .iter()
                .map(|term| term.to_token_stream().to_string())
                .collect();
            Some(format!("`ttl = \"{}\"`{DURATIONS_TOO}", written.join(" ")))
        }
        _ => None,
    }
}

/// The other options a duration written without a name may be meant for.
const DURATIONS_TOO: &str = " (`lease` and `wait` take a duration too)";

/// `names`, each in backticks, separated by commas: how errors list the
/// options, arguments or extractors to choose from.
pub(crate) fn listed(names: &[impl AsRef<str>]) -> String {
    let names: Vec<String> = names
        .iter()
        .map(|name| format!("`{}`", name.as_ref()))
        .collect();
    names.join(", ")
}

/// `ttl =` with nothing after the `=`, consumed: syn alone would say
/// "unexpected end of input" at the whole attribute.
fn missing_value(input: ParseStream<'_>) -> Option<syn::Error> {
    let fork = input.fork();
    let name = fork.call(Ident::parse_any).ok()?;
    let eq_token = fork.parse::<Token![=]>().ok()?;
    if !(fork.is_empty() || fork.peek(Token![,])) {
        return None;
    }
    syn::parse::discouraged::Speculative::advance_to(input, &fork);
    let key = name.to_string();
    let message = if OPTIONS.contains(&key.as_str()) {
        format!("`{key}` has no value after `=`: write {}", value_form(&key))
    } else {
        unknown_option(&key)
    };
    Some(syn::Error::new_spanned(
        quote::quote!(#name #eq_token),
        message,
    ))
}

/// How the option `key` is written with a value, for an option whose
/// value is missing.
fn value_form(key: &str) -> String {
    match key {
        "optional" | "exact_repeats" => format!("`{key} = true`, `{key} = false` or `{key}`"),
        "skip" => "`skip(argument, ...)`, without `=`".to_owned(),
        _ => form(key).to_owned(),
    }
}

/// `ttl: "24h"`, as in a struct literal or another language's keyword
/// arguments, with a value that cannot be read: syn alone would say
/// "expected `,`" at the colon.
fn colon_instead_of_equals(input: ParseStream<'_>) -> syn::Error {
    let fork = input.fork();
    let (Ok(name), Ok(colon)) = (fork.parse::<Ident>(), fork.parse::<Token![:]>()) else {
        return input.error("expected an option");
    };
    colon_error(colon, &value_form(&name.to_string()))
}

/// An option's `:` where its `=` goes, and how to write it (`fixed`).
fn colon_error(colon: Token![:], fixed: &str) -> syn::Error {
    let message = format!("options take `=`, not `:`: write {fixed}");
    syn::Error::new(colon.span, message)
}

/// Why an option given twice is refused: which of its values is meant
/// cannot be told, and `skip` takes every argument in one list.
fn given_twice(key: &str) -> String {
    if key == "skip" {
        "`skip` is given more than once: name every argument in one `skip(a, b)`".to_owned()
    } else {
        format!("`{key}` is given more than once: keep one")
    }
}

/// How the option `key` is written, for the errors about its form.
fn form(key: &str) -> &'static str {
    match key {
        "ttl" => "`ttl = \"24h\"`",
        "lease" => "`lease = \"60s\"`",
        "wait" => "`wait = \"5s\"`",
        "scope" => {
            "`scope = \"api_key\"`, `scope = \"global\"`, `scope = \"header:<name>\"` or `scope = path::to::Principal`"
        }
        "name" => "`name = \"orders.create\"`",
        "final_statuses" => "`final_statuses = \"2xx, 404\"`",
        "crate" => "`crate = \"::idempotent_core\"`",
        _ => "`option = ...`",
    }
}

/// The candidate fewest edits from `written`, the first of those on a
/// tie, for "did you mean" hints: within two edits, or one when either
/// name has at most three characters, since any two names that short are
/// within two edits of each other.
pub(crate) fn closest<'a>(
    written: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .filter_map(|candidate| {
            let shorter = written.chars().count().min(candidate.chars().count());
            let most = if shorter <= 3 { 1 } else { 2 };
            let distance = edit_distance(written, candidate);
            // A name as short as the edits between them shares nothing
            // with the other: `a` is one edit from `p`, and no typo of it.
            (distance <= most && distance < shorter).then_some((distance, candidate))
        })
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

fn unknown_option(key: &str) -> String {
    let hint = intent_hint(key)
        .or_else(|| {
            // `TTL` is `ttl` in the wrong case, not three edits away.
            closest(&key.to_ascii_lowercase(), OPTIONS)
                .map(|option| format!("did you mean `{option}`? "))
        })
        .unwrap_or_default();
    format!(
        "unknown option `{key}`; {hint}the options are {}",
        listed(&OPTIONS)
    )
}

/// Settings of the whole router, which an endpoint does not override.
const ROUTER_SETTINGS: [&str; 4] = [
    "store_timeout",
    "fail_open",
    "max_body_bytes",
    "api_key_header",
];

/// What a name that is not an option most likely meant, where the nearest
/// spelling would mislead: an option of another attribute (`state`, from
/// `#[axum::debug_handler]`, is two edits from `crate`), a router-wide
/// setting, or a setting that is spelled differently here.
fn intent_hint(key: &str) -> Option<String> {
    if ROUTER_SETTINGS.contains(&key) {
        return Some(format!(
            "`{key}` is set for the whole router, with `Idempotency::builder(store).{key}(..)`; "
        ));
    }
    if let Some(scope) = scope_without_its_name(key) {
        return Some(format!(
            "a scope is the value of the `scope` option: write {scope}; "
        ));
    }
    let hint = match key {
        "state" => {
            "`#[idempotent]` needs no state type: `State<T>` arguments work as written, and are not fingerprinted; "
        }
        "timeout" => {
            "how long a duplicate waits for the first request is `wait`, how long a claim holds without renewal is `lease`, and the store's timeout is set for the whole router, with `Idempotency::builder(store).store_timeout(..)`; "
        }
        "header" | "key_header" => {
            "the key is always read from `Idempotency-Key`; to scope keys by a header, write `scope = \"header:<name>\"`; "
        }
        "required" => "a key is required unless the endpoint is `optional`; ",
        "ignore" | "exclude" => "did you mean `skip`? ",
        "expiry" | "expires" | "expiration" | "retention" => "did you mean `ttl`? ",
        _ => return None,
    };
    Some(hint.to_owned())
}

/// `scope` written with `key`, when `key` is a scope written without the
/// option's name (`#[idempotent(global)]`, `#[idempotent(User)]`): a named
/// scope, or a path whose last segment is capitalized like a type, unless
/// it is an option in capitals (`TTL`).
fn scope_without_its_name(key: &str) -> Option<String> {
    if matches!(key, "api_key" | "global") {
        return Some(format!("`scope = \"{key}\"`"));
    }
    let last = key.rsplit("::").next().unwrap_or(key);
    let typelike = last.starts_with(|c: char| c.is_ascii_uppercase());
    let an_option = closest(&last.to_ascii_lowercase(), OPTIONS).is_some();
    (typelike && !an_option).then(|| format!("`scope = {key}`"))
}

/// Levenshtein distance, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

fn option_name(path: &Path) -> String {
    let name = quote::quote!(#path).to_string();
    name.replace(' ', "")
}

fn name_value(meta: &Meta) -> syn::Result<&Expr> {
    match meta {
        Meta::NameValue(MetaNameValue { value, .. }) => Ok(value),
        _ => Err(syn::Error::new_spanned(
            meta,
            format!("expected {}", form(&option_name(meta.path()))),
        )),
    }
}

fn string_value(meta: &Meta) -> syn::Result<LitStr> {
    match name_value(meta)? {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => without_suffix(lit).cloned(),
        other => {
            let key = option_name(meta.path());
            Err(syn::Error::new_spanned(
                other,
                format!(
                    "`{key}` takes a string literal, as in {}{}",
                    form(&key),
                    not_evaluated(other)
                ),
            ))
        }
    }
}

/// Why a constant, a call or a macro cannot stand in for a literal: the
/// attribute reads the value while the crate is being compiled, before any
/// of them has one.
fn not_evaluated(value: &Expr) -> &'static str {
    match value {
        Expr::Path(_) | Expr::Macro(_) | Expr::Call(_) | Expr::MethodCall(_) => {
            "; the attribute reads the value as written, so a constant, a function or a macro cannot stand in for it"
        }
        _ => "",
    }
}

/// `lit`, refused if it has a suffix (`"24h"x`), which rustc accepts in
/// an attribute and the value would silently drop.
fn without_suffix(lit: &LitStr) -> syn::Result<&LitStr> {
    if lit.suffix().is_empty() {
        return Ok(lit);
    }
    let message = format!(
        "unexpected suffix `{}` after the string: write `{}`",
        lit.suffix(),
        lit.token().to_string().trim_end_matches(lit.suffix())
    );
    Err(syn::Error::new(lit.span(), message))
}

fn flag(meta: &Meta) -> syn::Result<bool> {
    match meta {
        Meta::Path(_) => Ok(true),
        Meta::NameValue(MetaNameValue {
            value:
                Expr::Lit(ExprLit {
                    lit: Lit::Bool(value),
                    ..
                }),
            ..
        }) => Ok(value.value),
        Meta::NameValue(MetaNameValue {
            value: Expr::Lit(ExprLit {
                lit: Lit::Str(lit), ..
            }),
            ..
        }) if matches!(lit.value().as_str(), "true" | "false") => {
            let name = option_name(meta.path());
            Err(syn::Error::new(
                lit.span(),
                format!(
                    "`{name}` takes a bool, not a string: write `{name} = {}`",
                    lit.value()
                ),
            ))
        }
        Meta::NameValue(MetaNameValue { value, .. }) => {
            let name = option_name(meta.path());
            Err(syn::Error::new_spanned(
                value,
                format!(
                    "`{name}` takes `true` or `false`: write `{name} = true` (or `{name}` alone) or `{name} = false`{}",
                    not_evaluated(value)
                ),
            ))
        }
        Meta::List(_) => {
            let name = option_name(meta.path());
            Err(syn::Error::new_spanned(
                meta,
                format!("expected `{name}` or `{name} = true | false`"),
            ))
        }
    }
}

/// What `skip` takes, for its errors.
const SKIP_FORM: &str = "expected the names of handler arguments, as in `skip(trace, debug)`; a destructured argument is named by its binding, `body` in `Json(body): Json<T>`";

/// The names in `skip(...)`. An empty list skips nothing, so that a
/// `macro_rules!` may pass one through; a name given twice is an error at
/// the second, and the list without it is kept so that its other names are
/// still checked against the handler's arguments.
fn skip_list(meta: &Meta, errors: &mut Errors) -> syn::Result<Vec<Ident>> {
    let list = match meta {
        Meta::List(list) => list,
        // `skip = body`: the list form with the name the value gives.
        Meta::NameValue(MetaNameValue {
            value: Expr::Path(path),
            ..
        }) if path.path.get_ident().is_some() => {
            let name = path.path.to_token_stream();
            return Err(syn::Error::new_spanned(
                meta,
                format!("`skip` takes a list of argument names: write `skip({name})`"),
            ));
        }
        _ => {
            return Err(syn::Error::new_spanned(
                meta,
                "expected `skip(argument, ...)` naming handler arguments",
            ));
        }
    };
    let mut names: Vec<Ident> = Vec::new();
    for name in list.parse_args_with(skip_names)? {
        if names.contains(&name) {
            errors.spanned(&name, format!("`{name}` is named twice in `skip`"));
        } else {
            names.push(name);
        }
    }
    Ok(names)
}

/// `a, b, ...` parsed by hand, so that anything but a name (a pattern, a
/// type, a string) gets [`SKIP_FORM`] rather than syn's "expected `,`".
fn skip_names(input: ParseStream<'_>) -> syn::Result<Vec<Ident>> {
    let mut names = Vec::new();
    while !input.is_empty() {
        names.push(skip_name(input)?);
        if !input.is_empty() {
            input
                .parse::<Token![,]>()
                .map_err(|error| syn::Error::new(error.span(), SKIP_FORM))?;
        }
    }
    Ok(names)
}

fn skip_name(input: ParseStream<'_>) -> syn::Result<Ident> {
    // A quoted name is the likeliest slip, so it gets the fix itself.
    if input.peek(LitStr) {
        let lit: LitStr = input.parse()?;
        let message = format!(
            "`skip` takes argument names without quotes: `skip({})`",
            lit.value()
        );
        return Err(syn::Error::new(lit.span(), message));
    }
    input
        .parse::<Ident>()
        .map_err(|error| syn::Error::new(error.span(), SKIP_FORM))
}

/// The endpoint's name is its identity in every fingerprint and in the
/// logs: whitespace at either end would silently make it another
/// endpoint than the name without it, and a control character would
/// garble the log lines it is written to.
fn endpoint_name(lit: LitStr) -> syn::Result<LitStr> {
    let value = lit.value();
    let why = if value.trim().is_empty() {
        "the endpoint name is empty"
    } else if value.trim() != value {
        "the endpoint name starts or ends with whitespace, which would make it an endpoint of its own"
    } else if value.chars().any(char::is_control) {
        "the endpoint name has a control character, which the logs it is written to would garble"
    } else {
        return Ok(lit);
    };
    let message = format!("{why}; expected a name such as {}", form("name"));
    Err(syn::Error::new(lit.span(), message))
}

/// A crate or module path: no generic arguments (`Path::parse_mod_style`),
/// which would otherwise be spliced into every path the attribute writes.
fn crate_path(value: &Expr) -> syn::Result<Path> {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => without_suffix(lit)?
            .parse_with(Path::parse_mod_style)
            .map_err(|_| {
                syn::Error::new(
                    lit.span(),
                    "expected a path such as `\"::idempotent_core\"`",
                )
            }),
        Expr::Path(path)
            if path.qself.is_none() && path.path.segments.iter().all(|s| s.arguments.is_none()) =>
        {
            Ok(path.path.clone())
        }
        other => Err(syn::Error::new_spanned(
            other,
            "expected a path such as `\"::idempotent_core\"`",
        )),
    }
}

// ===== scope =====

/// What `scope` takes, for its errors.
const SCOPE_FORMS: &str = "expected `\"api_key\"`, `\"global\"`, `\"header:<name>\"` or the path of a type implementing `IdempotencyScope`";

/// A scope's value: a string literal, or a type path that [`AttrOption`]
/// carried verbatim (a path alone parses as a type there too).
fn scope(value: &Expr) -> syn::Result<Scope> {
    let custom = match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => return named_scope(without_suffix(lit)?),
        Expr::Verbatim(tokens) => syn::parse2::<Type>(tokens.clone()).ok(),
        _ => None,
    };
    match custom {
        Some(Type::Path(path)) if path.qself.is_none() => match named_scope_as_path(&path.path) {
            Some(name) => Err(syn::Error::new_spanned(
                value,
                format!(
                    "the scope `{}` is a string: write `scope = \"{name}\"`; a path names a type implementing `IdempotencyScope`",
                    option_name(&path.path)
                ),
            )),
            None => Ok(Scope::Custom(path.path)),
        },
        _ => Err(syn::Error::new_spanned(value, SCOPE_FORMS)),
    }
}

/// The string scope a path most likely means: `scope = global` is a
/// string without its quotes far more often than a type of that name, and
/// `Scope::ApiKey` is the public enum's variant, not a type.
fn named_scope_as_path(path: &Path) -> Option<&'static str> {
    let names: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
    match names
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["api_key"] => Some("api_key"),
        ["global"] => Some("global"),
        [.., "Scope", "ApiKey"] => Some("api_key"),
        [.., "Scope", "Global"] => Some("global"),
        [.., "Scope", "Header"] => Some("header:<name>"),
        _ => None,
    }
}

fn named_scope(lit: &LitStr) -> syn::Result<Scope> {
    let value = lit.value();
    match value.as_str() {
        "api_key" => Ok(Scope::ApiKey),
        "global" => Ok(Scope::Global),
        _ => match value.strip_prefix("header:") {
            Some(header) => header_name(header).map(Scope::Header).map_err(|why| {
                syn::Error::new(
                    lit.span(),
                    format!("{why}; a header scope is written as `\"header:x-tenant-id\"`"),
                )
            }),
            None if value.trim().is_empty() => Err(syn::Error::new(
                lit.span(),
                format!("the scope is empty; {SCOPE_FORMS}"),
            )),
            None => Err(syn::Error::new(
                lit.span(),
                format!(
                    "unknown scope `{value}`; {}{SCOPE_FORMS}",
                    scope_hint(&value)
                ),
            )),
        },
    }
}

/// "did you mean" for a scope string: the names are lowercase with an
/// underscore (`API_KEY`, `api-key` and `Header:x-tenant` are near
/// misses), and a bare header name is one without its `header:` prefix.
fn scope_hint(value: &str) -> String {
    let folded = value.to_ascii_lowercase().replace('-', "_");
    if folded == "header" {
        return "a header scope names its header after `header:`, as in `\"header:x-tenant-id\"`; "
            .to_owned();
    }
    let suggestion = if let Some(name) = closest(&folded, ["api_key", "global"]) {
        name.to_owned()
    } else if folded.starts_with("header:") {
        let header = &value["header:".len()..];
        if header_name(header).is_err() {
            return String::new();
        }
        format!("header:{header}")
    } else if value.contains('-') && header_name(value).is_ok() {
        format!("header:{value}")
    } else {
        return String::new();
    };
    format!("did you mean `\"{suggestion}\"`? ")
}

/// A valid HTTP header name (RFC 9110 token), lowercased as `HeaderMap`
/// stores names.
fn header_name(name: &str) -> Result<String, String> {
    const SYMBOLS: &[u8] = b"!#$%&'*+-.^_`|~";
    if name.is_empty() {
        return Err(
            "the scope `header:` names no header: write its name after the colon".to_owned(),
        );
    }
    if !name
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || SYMBOLS.contains(&byte))
    {
        return Err(format!(
            "invalid scope header `{name}`: a header name is letters, digits and `!#$%&'*+-.^_`|~`, without spaces"
        ));
    }
    Ok(name.to_ascii_lowercase())
}

// ===== durations =====

/// What a duration looks like, for its errors.
const DURATION_USAGE: &str =
    "expected a duration such as \"500ms\", \"90s\", \"15m\", \"24h\", \"7d\" or \"1h 30m\"";
/// The units, for the errors about one.
const UNITS: &str = "the units are `ms`, `s`, `m` (minutes), `h` and `d`, in lowercase, as in \"90s\" or \"1h 30m\"";
/// The longest TTL, lease or wait an `Endpoint` keeps, a century, in
/// milliseconds: it would cut a longer one short without a word.
const LONGEST_MILLIS: u64 = 100 * 365 * 86_400_000;

/// Milliseconds in a humantime-style literal: one or more `<integer><unit>`
/// terms, units `ms`, `s`, `m`, `h`, `d`, e.g. `"90s"`, `"1h 30m"`.
fn duration_millis(lit: &LitStr) -> syn::Result<u64> {
    parse_duration(&lit.value()).map_err(|why| syn::Error::new(lit.span(), why))
}

/// Why a zero wait is refused: it would make a duplicate in flight wait
/// for nothing, which is what leaving `wait` out already does.
const WAIT_ZERO: &str = "a `wait` of zero waits for nothing: leave `wait` out for a duplicate that arrives in flight to get 409 at once, or give it time, as in `wait = \"5s\"`";

/// The wait in `lit`, in milliseconds, refused at zero.
fn wait_millis(lit: &LitStr) -> syn::Result<u64> {
    match duration_millis(lit)? {
        0 => Err(syn::Error::new(lit.span(), WAIT_ZERO)),
        millis => Ok(millis),
    }
}

/// Why a lease under a second is refused. The engine renews a lease every
/// third of it; with a durable store's round trips taking milliseconds, a
/// shorter one can lapse under a handler still running and let a duplicate
/// run it again.
const LEASE_TOO_SHORT: &str = "the lease must be at least \"1s\": it is renewed every third of it while the handler runs, and a shorter one can lapse between renewals and let a duplicate run the handler again";
/// Why a TTL under a second is refused: the engine would raise it to a
/// second, and a silent change is worse than an error. A `"0s"` is often
/// meant as "for good", so the message says how long the longest is.
const TTL_TOO_SHORT: &str = "the ttl must be at least \"1s\": it is how long a finished response is replayed to retries, and with none every retry would run the handler again; zero does not mean \"for good\": the longest ttl is \"36500d\"";

/// The duration in `lit`, in milliseconds, refused with `why` under a
/// second (the shortest TTL or lease an `Endpoint` takes), zero included:
/// the fix for `"0s"` is the same as for `"500ms"`.
fn at_least_a_second(lit: &LitStr, why: &str) -> syn::Result<u64> {
    let millis = duration_millis(lit)?;
    if millis < 1_000 {
        return Err(syn::Error::new(lit.span(), why));
    }
    Ok(millis)
}

/// Spaces may surround the literal and stand between terms or between a
/// number and its unit (`"1h30m"`, `"1h 30m"`, `"24 h"`): none of them
/// changes what the literal means.
fn parse_duration(text: &str) -> Result<u64, String> {
    let mut rest = text.trim_start();
    if rest.is_empty() {
        return Err(format!("empty duration; {DURATION_USAGE}"));
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let (millis, tail) =
            duration_term(rest).map_err(|why| format!("invalid duration `{text}`: {why}"))?;
        total = total.saturating_add(millis);
        rest = tail.trim_start();
    }
    if total > LONGEST_MILLIS {
        return Err(format!(
            "the duration `{text}` is longer than a century (\"36500d\"), the longest an endpoint keeps"
        ));
    }
    Ok(total)
}

/// The first `<integer><unit>` term of `text`, in milliseconds (saturated:
/// too long is refused as a whole), and what follows it.
fn duration_term(text: &str) -> Result<(u64, &str), String> {
    if text.starts_with('-') {
        return Err("a duration cannot be negative".to_owned());
    }
    let (number, tail) = split_while(text, |c| c.is_ascii_digit());
    if number.is_empty() {
        let found = text.split_whitespace().next().unwrap_or(text);
        return Err(format!(
            "`{found}` does not start with a number; {DURATION_USAGE}"
        ));
    }
    if tail.starts_with('_') {
        // As in a Rust literal; without this, `10_000s` would be "`10`
        // has no unit".
        let (digits, _) = split_while(text, |c| c.is_ascii_digit() || c == '_');
        return Err(format!(
            "a duration's numbers take no `_`: write `{}` for `{digits}`",
            digits.replace('_', "")
        ));
    }
    if tail.starts_with(['.', ',']) {
        return Err(
            "a duration takes whole numbers: combine units instead, as in \"1h 30m\" or \"90m\""
                .to_owned(),
        );
    }
    let (unit, tail) = split_while(tail.trim_start(), |c| c.is_ascii_alphabetic());
    let scale = unit_millis(unit).ok_or_else(|| unknown_unit(number, unit))?;
    // Only an overflowing number of digits fails to parse.
    let count = number.parse::<u64>().unwrap_or(u64::MAX);
    Ok((count.saturating_mul(scale), tail))
}

/// Splits `text` after its leading characters that match `keep`.
fn split_while(text: &str, keep: impl Fn(char) -> bool) -> (&str, &str) {
    let end = text.find(|c: char| !keep(c)).unwrap_or(text.len());
    text.split_at(end)
}

/// Why `unit`, written after `number`, is not a unit, with the fix when
/// the unit is spelled out or capitalized, or is weeks, months or years
/// (written in days). `M` is not taken for minutes alone: elsewhere it
/// means months, so its error names both fixes.
fn unknown_unit(number: &str, unit: &str) -> String {
    if unit.is_empty() {
        return format!("`{number}` has no unit; {UNITS}");
    }
    let lowered = unit.to_ascii_lowercase();
    // Minutes to some, months to others: both fixes are named.
    if unit == "M" {
        let months =
            in_days(number, "month").map(|days| format!(", or `{days}d` for months of 30 days"));
        return format!(
            "`M` is not a unit: write `{number}m` for minutes{}; {UNITS}",
            months.unwrap_or_default()
        );
    }
    if let Some(days) = in_days(number, &lowered) {
        return format!("`{unit}` is not a unit, write `{days}d`; {UNITS}");
    }
    let fix = match lowered.as_str() {
        "ms" | "msec" | "msecs" | "millis" | "millisecond" | "milliseconds" => "ms",
        "s" | "sec" | "secs" | "second" | "seconds" => "s",
        "min" | "mins" | "minute" | "minutes" => "m",
        "h" | "hr" | "hrs" | "hour" | "hours" => "h",
        "d" | "day" | "days" => "d",
        _ => return format!("`{unit}` is not a unit; {UNITS}"),
    };
    format!("`{unit}` is not a unit, write `{number}{fix}`; {UNITS}")
}

/// `number` weeks, months or years (`unit`, in lowercase) in days, a
/// month taken as 30 of them and a year as 365, when that is no longer
/// than an endpoint keeps: the largest unit is the day.
fn in_days(number: &str, unit: &str) -> Option<u64> {
    let days_each = match unit {
        "w" | "wk" | "wks" | "week" | "weeks" => 7,
        "mo" | "mos" | "month" | "months" => 30,
        "y" | "yr" | "yrs" | "year" | "years" => 365,
        _ => return None,
    };
    let days = number.parse::<u64>().ok()?.checked_mul(days_each)?;
    (days <= LONGEST_MILLIS / 86_400_000).then_some(days)
}

fn unit_millis(unit: &str) -> Option<u64> {
    match unit {
        "ms" => Some(1),
        "s" => Some(1_000),
        "m" => Some(60_000),
        "h" => Some(3_600_000),
        "d" => Some(86_400_000),
        _ => None,
    }
}

// ===== final statuses =====

/// What `final_statuses` takes, for its errors.
const STATUS_USAGE: &str = "expected statuses, ranges and classes such as \"200-299, 404\" or \"2xx, 404\", \
     and `default` for the default ones, as in \"default, 409\"";

/// The word in the list that stands for the default final statuses.
const DEFAULT_STATUSES: &str = "default";

/// `final_statuses` as written: whether it names the default statuses,
/// and the ranges it lists (beside them, or alone).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct StatusList {
    pub(crate) with_default: bool,
    pub(crate) ranges: Vec<(u16, u16)>,
}

/// The list in a literal like `"200-299, 404"`, `"2xx, 404"` or
/// `"default, 409"`. Entries may overlap (`"default, 2xx"` is their
/// union), but `default` twice is refused as the slip it most likely is.
fn status_list(lit: &LitStr) -> syn::Result<StatusList> {
    let value = lit.value();
    let list = if value.trim().is_empty() {
        Err("the list of final statuses is empty, so no response would be stored".to_owned())
    } else {
        value
            .split(',')
            .map(str::trim)
            .try_fold(StatusList::default(), add_entry)
    };
    list.map_err(|why| syn::Error::new(lit.span(), format!("{why}; {STATUS_USAGE}")))
}

/// `list` with the entry `part` added.
fn add_entry(mut list: StatusList, part: &str) -> Result<StatusList, String> {
    if part == DEFAULT_STATUSES {
        if list.with_default {
            return Err("`default` is listed twice: keep one".to_owned());
        }
        list.with_default = true;
    } else {
        let range = status_range(part)
            .map_err(|why| without_commas(part).unwrap_or_else(|| default_hint(part, why)))?;
        // The engine never stores a 1xx (`FinalStatuses::is_final`): such
        // an entry would change nothing, and was likely meant to.
        if range.1 < 200 {
            return Err(format!(
                "`{part}` lists only informational statuses (1xx), which are never stored: a 1xx is no final answer and could not be replayed"
            ));
        }
        list.ranges.push(range);
    }
    Ok(list)
}

/// Why `part` is refused when it is entries written without commas
/// between them (`"2xx 404"`, `"default; 409"`): the error about it as one
/// entry would call `"404 2xx"` no status class, and hide the fix.
fn without_commas(part: &str) -> Option<String> {
    let entries: Vec<&str> = part
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|entry| !entry.is_empty())
        .collect();
    let each_an_entry = entries
        .iter()
        .all(|entry| *entry == DEFAULT_STATUSES || status_range(entry).is_ok());
    (entries.len() > 1 && each_an_entry).then(|| {
        format!(
            "`{part}` holds {} entries without commas between them: write `{}`",
            entries.len(),
            entries.join(", ")
        )
    })
}

/// Why `part` is refused, asking whether it is a misspelt `default`
/// (`defualt`, `Default`) when it looks like one.
fn default_hint(part: &str, why: String) -> String {
    match closest(&part.to_ascii_lowercase(), [DEFAULT_STATUSES]) {
        Some(word) => format!("`{part}` is not a status (did you mean `{word}`?)"),
        None => why,
    }
}

/// One entry: a status, a class, or a range whose ends are either
/// (`"2xx-4xx"` is `200-499`).
fn status_range(part: &str) -> Result<(u16, u16), String> {
    if part.is_empty() {
        return Err("an entry of the list is empty".to_owned());
    }
    let (first, last) = match part.split_once('-') {
        Some((first, last)) => (statuses(first.trim())?.0, statuses(last.trim())?.1),
        None => statuses(part)?,
    };
    if first > last {
        return Err(format!("the range `{part}` is empty"));
    }
    Ok((first, last))
}

/// The first and last status `text` stands for: one status, or a class.
fn statuses(text: &str) -> Result<(u16, u16), String> {
    match status_class(text) {
        Some(class) => class,
        None => status(text).map(|code| (code, code)),
    }
}

/// The class in `text` if it is written as one: a digit and `xx`, in
/// either case, as HTTP writes `2xx` and OpenAPI `2XX`.
fn status_class(text: &str) -> Option<Result<(u16, u16), String>> {
    let (digit, suffix) = text.split_at_checked(text.len().checked_sub(2)?)?;
    if !suffix.eq_ignore_ascii_case("xx") {
        return None;
    }
    Some(match digit.parse::<u16>() {
        Ok(class @ 1..=5) if digit.len() == 1 => Ok((class * 100, class * 100 + 99)),
        _ => Err(format!("`{text}` is not a status class (`1xx` to `5xx`)")),
    })
}

fn status(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(code @ 100..=599) => Ok(code),
        _ if text.is_empty() => Err("a status is missing".into()),
        _ if text == DEFAULT_STATUSES => {
            Err("`default` is an entry of its own, not the end of a range".into())
        }
        _ => Err(format!("`{text}` is not an HTTP status (100-599)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert_eq!(parse_duration("90s"), Ok(90_000));
        assert_eq!(parse_duration("15m"), Ok(900_000));
        assert_eq!(parse_duration("24h"), Ok(86_400_000));
        assert_eq!(parse_duration("7d"), Ok(604_800_000));
        assert_eq!(parse_duration("1h 30m"), Ok(5_400_000));
        assert_eq!(parse_duration("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration(" 24h "), Ok(86_400_000));
        assert_eq!(parse_duration("24 h"), Ok(86_400_000));
        assert_eq!(parse_duration("36500d"), Ok(LONGEST_MILLIS));
        assert!(parse_duration("24x").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("36501d").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn duration_errors_say_what_to_write() {
        let error = |text| parse_duration(text).unwrap_err();
        assert!(error("24H").contains("write `24h`"));
        assert!(error("5min").contains("write `5m`"));
        assert!(error("2 hours").contains("write `2h`"));
        let months = error("1M");
        assert!(
            months.contains("write `1m` for minutes, or `30d` for months"),
            "{months}"
        );
        assert!(error("2 months").contains("write `60d`"));
        assert!(error("1.5h").contains("whole numbers"));
        assert!(error("10").contains("`10` has no unit"));
        assert!(error("1000000d").contains("longer than a century"));
        assert!(error("-5s").contains("cannot be negative"));
        assert!(error("1h -30m").contains("cannot be negative"));
        assert!(error("10_000s").contains("write `10000` for `10_000`"));
        assert!(error("1y").contains("write `365d`"));
        assert!(error("2 weeks").contains("write `14d`"));
        assert!(error("1h 2W").contains("write `14d`"));
        assert!(!error("101y").contains("write"));
    }

    #[test]
    fn statuses() {
        assert_eq!(status_range("2xx"), Ok((200, 299)));
        assert_eq!(status_range("2XX"), Ok((200, 299)));
        assert_eq!(status_range("5Xx"), Ok((500, 599)));
        assert_eq!(status_range("404"), Ok((404, 404)));
        assert_eq!(status_range("400 - 403"), Ok((400, 403)));
        assert_eq!(status_range("2xx-4XX"), Ok((200, 499)));
        assert_eq!(status_range("200-3xx"), Ok((200, 399)));
        assert!(status_range("299-200").is_err());
        assert!(status_range("4xx-2xx").is_err());
        assert!(status_range("600").is_err());
        assert!(status_range("").is_err());
        assert!(status_range("6xx").unwrap_err().contains("status class"));
        assert!(status_range("xx").unwrap_err().contains("status class"));
        assert!(status_range("20xx").is_err());
        assert!(status_range("é").is_err());
    }

    fn list(text: &str) -> Result<StatusList, String> {
        status_list(&LitStr::new(text, proc_macro2::Span::call_site()))
            .map_err(|error| error.to_string())
    }

    /// A list written with spaces or semicolons where its commas go is
    /// told to take commas, not that one of its entries is no status.
    #[test]
    fn entries_without_commas_between_them_get_the_commas() {
        let cases = [
            ("2xx 404", "`2xx, 404`"),
            ("404 2xx", "`404, 2xx`"),
            ("default; 409", "`default, 409`"),
            ("200 201 404", "`200, 201, 404`"),
        ];
        for (written, fix) in cases {
            let error = list(written).unwrap_err();
            let expected = format!("without commas between them: write {fix}");
            assert!(error.contains(&expected), "{written}: {error}");
        }
        // Spaces around a range's dash are no separator.
        assert_eq!(
            list("400 - 403").map(|list| list.ranges),
            Ok(vec![(400, 403)])
        );
        assert!(!list("2xx conflict").unwrap_err().contains("commas"));
    }

    /// An entry of 1xx statuses alone would do nothing: the engine never
    /// stores a 1xx, which it could not replay. A range that reaches past
    /// them (`"100-599"`, every final status) is fine.
    #[test]
    fn an_entry_of_informational_statuses_alone_is_refused() {
        for written in ["1xx", "101", "2xx, 100-199"] {
            let error = list(written).unwrap_err();
            assert!(error.contains("never stored"), "{written}: {error}");
        }
        assert_eq!(
            list("100-599").map(|list| list.ranges),
            Ok(vec![(100, 599)])
        );
    }

    #[test]
    fn the_default_statuses_join_the_listed_ones() {
        let with_default = |ranges: Vec<(u16, u16)>| StatusList {
            with_default: true,
            ranges,
        };
        assert_eq!(list("default, 409"), Ok(with_default(vec![(409, 409)])));
        assert_eq!(
            list("409, default , 423"),
            Ok(with_default(vec![(409, 409), (423, 423)]))
        );
        assert_eq!(list("default"), Ok(with_default(vec![])));
        // Overlapping the default is allowed: the union is stored.
        assert_eq!(list("default, 2xx"), Ok(with_default(vec![(200, 299)])));
        assert_eq!(
            list("2xx, 404"),
            Ok(StatusList {
                with_default: false,
                ranges: vec![(200, 299), (404, 404)],
            })
        );
    }

    #[test]
    fn a_misplaced_or_misspelt_default_is_refused() {
        assert!(
            list("default, 409, default")
                .unwrap_err()
                .starts_with("`default` is listed twice: keep one")
        );
        for typo in ["defualt", "Default", "defaults"] {
            let error = list(&format!("{typo}, 409")).unwrap_err();
            assert!(
                error.starts_with(&format!(
                    "`{typo}` is not a status (did you mean `default`?); expected"
                )),
                "{error}"
            );
        }
        assert!(
            list("default-409")
                .unwrap_err()
                .contains("not the end of a range")
        );
        assert!(!list("conflict").unwrap_err().contains("did you mean"));
        assert!(
            list("600")
                .unwrap_err()
                .contains("`default` for the default ones")
        );
    }

    /// The messages of the errors `errors` collected, in order.
    fn messages(errors: Errors) -> Vec<String> {
        let errors = errors.into_error().into_iter().flatten();
        errors.map(|error| error.to_string()).collect()
    }

    #[test]
    fn an_option_without_its_equals_sign_is_read_all_the_same() {
        let mut errors = Errors::default();
        let tokens = quote::quote!(ttl: "2h", scope "global", tll = "1h", lease: "1d");
        let args = Args::parse(tokens, &mut errors);
        assert_eq!(args.ttl, Some(7_200_000));
        assert!(matches!(args.scope, Some(Scope::Global)));
        assert_eq!(args.lease, Some(86_400_000));
        let messages = messages(errors);
        assert_eq!(messages.len(), 4, "{messages:?}");
        assert!(messages[0].contains("write `ttl = \"2h\"`"), "{messages:?}");
        assert!(
            messages[1].contains("expected `=` between `scope`"),
            "{messages:?}"
        );
        assert!(messages[2].contains("unknown option `tll`"), "{messages:?}");
        assert!(messages[3].contains("not `:`"), "{messages:?}");
    }

    /// What `Args::parse` read from `tokens`, and the errors it reported.
    fn parsed(tokens: TokenStream) -> (Args, Vec<String>) {
        let mut errors = Errors::default();
        let args = Args::parse(tokens, &mut errors);
        (args, messages(errors))
    }

    /// A value written as if options were positional is told which option
    /// it is the value of, when it can only be one, and the options after
    /// it are still read.
    #[test]
    fn a_value_without_its_option_name_names_the_option() {
        let cases = [
            (quote::quote!("24h"), "write `ttl = \"24h\"`"),
            (quote::quote!(24h), "write `ttl = \"24h\"`"),
            (quote::quote!(1h 30m), "write `ttl = \"1h 30m\"`"),
            (quote::quote!("global"), "write `scope = \"global\"`"),
            (
                quote::quote!("2xx, 404"),
                "write `final_statuses = \"2xx, 404\"`",
            ),
            (
                quote::quote!(5),
                "as `name = value`: the options are `ttl`, `lease`",
            ),
        ];
        for (tokens, fix) in cases {
            let (_, messages) = parsed(tokens.clone());
            assert_eq!(messages.len(), 1, "{tokens}: {messages:?}");
            assert!(messages[0].contains(fix), "{tokens}: {messages:?}");
        }
        let (args, messages) = parsed(quote::quote!("24h", scope = "global"));
        assert_eq!(messages.len(), 1, "{messages:?}");
        assert!(matches!(args.scope, Some(Scope::Global)));
    }

    #[test]
    fn values_a_macro_rules_passed_in_are_read_as_written() {
        // rustc hands a `macro_rules!` fragment (`ttl = $ttl`) to the
        // attribute wrapped in invisible delimiters.
        let invisible =
            |tokens: TokenStream| proc_macro2::Group::new(proc_macro2::Delimiter::None, tokens);
        let (ttl, user, flag, name, krate) = (
            invisible(quote::quote!("2h")),
            invisible(quote::quote!(auth::User)),
            invisible(quote::quote!(true)),
            invisible(quote::quote!("orders.create")),
            invisible(quote::quote!(::reexport::idempotent_core)),
        );
        let mut errors = Errors::default();
        let tokens = quote::quote!(ttl = #ttl, scope = #user, optional = #flag, name = #name, crate = #krate, wait = "1s");
        let args = Args::parse(tokens, &mut errors);
        let messages = messages(errors);
        assert!(messages.is_empty(), "{messages:?}");
        assert_eq!(args.ttl, Some(7_200_000));
        assert!(
            args.principal()
                .is_some_and(|path| path.segments.len() == 2)
        );
        assert!(args.optional);
        assert_eq!(
            args.name.as_ref().map(LitStr::value).as_deref(),
            Some("orders.create")
        );
        assert_eq!(
            args.private().to_string().replace(' ', ""),
            "::reexport::idempotent_core::__private"
        );
    }

    #[test]
    fn unknown_options_get_a_hint_when_close() {
        assert!(unknown_option("scopes").contains("did you mean `scope`?"));
        assert!(unknown_option("optinal").contains("did you mean `optional`?"));
        assert!(!unknown_option("retries").contains("did you mean"));
        assert!(unknown_option("expires").contains("did you mean `ttl`?"));
        assert!(unknown_option("TTL").contains("did you mean `ttl`?"));
        assert!(unknown_option("Final_Status").contains("did you mean `final_statuses`?"));
    }

    #[test]
    fn unknown_options_that_mean_something_else_say_what() {
        // `state` is two edits from `crate`, which it never means.
        let state = unknown_option("state");
        assert!(state.contains("needs no state type"), "{state}");
        assert!(!state.contains("did you mean"), "{state}");
        assert!(unknown_option("timeout").contains("store_timeout"));
        assert!(unknown_option("fail_open").contains("Idempotency::builder(store).fail_open(..)"));
        assert!(unknown_option("key_header").contains("Idempotency-Key"));
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    /// A scope written without `scope =` is told to take it; an option in
    /// capitals is still taken for that option.
    #[test]
    fn a_scope_without_its_option_name_names_the_option() {
        let cases = [
            ("global", "write `scope = \"global\"`"),
            ("api_key", "write `scope = \"api_key\"`"),
            ("User", "write `scope = User`"),
            ("auth::User", "write `scope = auth::User`"),
        ];
        for (key, fix) in cases {
            let message = unknown_option(key);
            assert!(message.contains(fix), "{key}: {message}");
        }
        assert!(!unknown_option("TTL").contains("scope ="));
        assert!(!unknown_option("retries").contains("scope ="));
    }

    #[test]
    fn hints_name_the_nearest_candidate_and_only_a_near_one() {
        // One edit from `skip`, two from `scope`, which is listed first.
        assert_eq!(closest("scip", OPTIONS), Some("skip"));
        assert!(unknown_option("scip").contains("did you mean `skip`?"));
        // Any two names of two letters are two edits apart.
        assert_eq!(closest("tx", ["db", "id"]), None);
        assert_eq!(closest("x", ["db"]), None);
        // One-letter names have no letter in common: no typo of each other.
        assert_eq!(closest("a", ["p"]), None);
        assert_eq!(closest("bdy", ["headers", "body"]), Some("body"));
        assert_eq!(closest("wiat", OPTIONS), Some("wait"));
        assert_eq!(closest("tl", OPTIONS), Some("ttl"));
    }

    #[test]
    fn unknown_scopes_get_a_hint_when_close() {
        assert!(scope_hint("API_KEY").contains("\"api_key\""));
        assert!(scope_hint("api-key").contains("\"api_key\""));
        assert!(scope_hint("Global").contains("\"global\""));
        assert!(scope_hint("Header:X-Tenant").contains("\"header:X-Tenant\""));
        assert!(scope_hint("x-tenant-id").contains("\"header:x-tenant-id\""));
        assert_eq!(scope_hint("tenant"), "");
        assert!(scope_hint("header").contains("after `header:`"));
        assert!(scope_hint("Header").contains("after `header:`"));
        // Only a scope that would compile is suggested.
        assert_eq!(scope_hint("Header: x-tenant"), "");
        assert_eq!(scope_hint("HEADER:"), "");
    }

    #[test]
    fn header_names() {
        assert_eq!(header_name("X-Tenant"), Ok("x-tenant".into()));
        assert!(header_name("x tenant").is_err());
        assert!(header_name(" x-tenant").is_err());
        assert!(header_name("").is_err());
    }
}
