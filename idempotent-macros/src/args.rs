//! Parses and validates the attribute's options. Every problem becomes a
//! `syn::Error` spanned at the offending token; parsing goes on after an
//! error so that all of them are reported at once.

use proc_macro2::TokenStream;
use quote::ToTokens;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Expr, ExprLit, Ident, Lit, LitStr, Meta, MetaNameValue, Path, Token, Type};

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
    pub(crate) final_statuses: Option<Vec<(u16, u16)>>,
    /// `exact_repeats` as written, with the option's path for errors.
    pub(crate) exact_repeats: Option<(bool, Path)>,
    pub(crate) krate: Option<Path>,
}

impl Args {
    /// Parses the attribute's arguments, recording every error in `errors`.
    pub(crate) fn parse(tokens: TokenStream, errors: &mut Errors) -> Self {
        let parser = Punctuated::<AttrOption, Token![,]>::parse_terminated;
        let metas = match syn::parse::Parser::parse2(parser, tokens) {
            Ok(options) => options.into_iter().map(|option| option.0),
            Err(error) => {
                errors.push(error);
                return Self::default();
            }
        };
        let mut args = Self::default();
        let mut seen: Vec<String> = Vec::new();
        for meta in metas {
            let key = option_name(meta.path());
            if seen.contains(&key) {
                errors.spanned(meta.path(), format!("`{key}` is given more than once"));
                continue;
            }
            seen.push(key.clone());
            if let Err(error) = args.apply(&key, &meta) {
                errors.push(error);
            }
        }
        args
    }

    fn apply(&mut self, key: &str, meta: &Meta) -> syn::Result<()> {
        match key {
            "ttl" => self.ttl = Some(at_least_a_second(&string_value(meta)?, TTL_TOO_SHORT)?),
            "lease" => {
                self.lease = Some(at_least_a_second(&string_value(meta)?, LEASE_TOO_SHORT)?);
            }
            "wait" => self.wait = Some(duration_millis(&string_value(meta)?)?),
            "scope" => self.scope = Some(scope(name_value(meta)?)?),
            "optional" => self.optional = flag(meta)?,
            "skip" => self.skip = skip_list(meta)?,
            "name" => self.name = Some(endpoint_name(string_value(meta)?)?),
            "final_statuses" => {
                self.final_statuses = Some(status_ranges(&string_value(meta)?)?);
            }
            "exact_repeats" => self.exact_repeats = Some((flag(meta)?, meta.path().clone())),
            "crate" => self.krate = Some(crate_path(name_value(meta)?)?),
            _ => return Err(syn::Error::new_spanned(meta.path(), unknown_option(key))),
        }
        Ok(())
    }
}

/// One option, as a `Meta`. A type is not an expression (`Extension<User>`
/// would read as two comparisons), so `scope = <type>` is parsed as a type
/// and carried verbatim for [`scope`] to read back.
struct AttrOption(Meta);

impl Parse for AttrOption {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        if input.peek(Ident) && input.peek2(Token![=]) && !input.peek3(Lit) {
            let fork = input.fork();
            let path: Path = fork.parse()?;
            let eq_token: Token![=] = fork.parse()?;
            if path.is_ident("scope")
                && let Ok(ty) = fork.parse::<Type>()
                && (fork.is_empty() || fork.peek(Token![,]))
            {
                syn::parse::discouraged::Speculative::advance_to(input, &fork);
                let value = Expr::Verbatim(ty.into_token_stream());
                return Ok(Self(Meta::NameValue(MetaNameValue {
                    path,
                    eq_token,
                    value,
                })));
            }
        }
        input.parse().map(Self)
    }
}

fn unknown_option(key: &str) -> String {
    let options: Vec<String> = OPTIONS.iter().map(|option| format!("`{option}`")).collect();
    let hint = OPTIONS
        .iter()
        .find(|option| edit_distance(key, option) <= 2)
        .map(|option| format!("did you mean `{option}`? "))
        .unwrap_or_default();
    format!(
        "unknown option `{key}`; {hint}the options are {}",
        options.join(", ")
    )
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
            format!("expected `{} = ...`", option_name(meta.path())),
        )),
    }
}

fn string_value(meta: &Meta) -> syn::Result<LitStr> {
    match name_value(meta)? {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => Ok(lit.clone()),
        other => Err(syn::Error::new_spanned(
            other,
            format!("`{}` takes a string literal", option_name(meta.path())),
        )),
    }
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
        _ => {
            let name = option_name(meta.path());
            Err(syn::Error::new_spanned(
                meta,
                format!("expected `{name}` or `{name} = true | false`"),
            ))
        }
    }
}

fn skip_list(meta: &Meta) -> syn::Result<Vec<Ident>> {
    let Meta::List(list) = meta else {
        return Err(syn::Error::new_spanned(
            meta,
            "expected `skip(argument, ...)` naming handler arguments",
        ));
    };
    let names = list.parse_args_with(Punctuated::<Ident, Token![,]>::parse_terminated)?;
    Ok(names.into_iter().collect())
}

fn endpoint_name(lit: LitStr) -> syn::Result<LitStr> {
    if lit.value().trim().is_empty() {
        return Err(syn::Error::new(lit.span(), "the endpoint name is empty"));
    }
    Ok(lit)
}

fn crate_path(value: &Expr) -> syn::Result<Path> {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => lit.parse::<Path>().map_err(|_| {
            syn::Error::new(
                lit.span(),
                "expected a path such as `\"::idempotent_core\"`",
            )
        }),
        Expr::Path(path) => Ok(path.path.clone()),
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
        }) => return named_scope(lit),
        Expr::Verbatim(tokens) => syn::parse2::<Type>(tokens.clone()).ok(),
        _ => None,
    };
    match custom {
        Some(Type::Path(path)) if path.qself.is_none() => {
            // `scope = global` is a string without its quotes far more often
            // than a type of that name.
            match path.path.get_ident().map(ToString::to_string) {
                Some(name) if name == "api_key" || name == "global" => {
                    Err(syn::Error::new_spanned(
                        value,
                        format!(
                            "the scope `{name}` is a string: write `scope = \"{name}\"`; a path names a type implementing `IdempotencyScope`"
                        ),
                    ))
                }
                _ => Ok(Scope::Custom(path.path)),
            }
        }
        _ => Err(syn::Error::new_spanned(value, SCOPE_FORMS)),
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
                    format!("invalid scope header `{header}`: {why}"),
                )
            }),
            None => Err(syn::Error::new(
                lit.span(),
                format!("unknown scope `{value}`; {SCOPE_FORMS}"),
            )),
        },
    }
}

/// A valid HTTP header name (RFC 9110 token), lowercased as `HeaderMap`
/// stores names.
fn header_name(name: &str) -> Result<String, &'static str> {
    const SYMBOLS: &[u8] = b"!#$%&'*+-.^_`|~";
    if name.is_empty() {
        return Err("the header name is empty");
    }
    if !name
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || SYMBOLS.contains(&byte))
    {
        return Err("a header name is letters, digits and `!#$%&'*+-.^_`|~`");
    }
    Ok(name.to_ascii_lowercase())
}

// ===== durations =====

/// Milliseconds in a humantime-style literal: one or more `<integer><unit>`
/// terms, units `ms`, `s`, `m`, `h`, `d`, e.g. `"90s"`, `"1h 30m"`.
pub(crate) fn duration_millis(lit: &LitStr) -> syn::Result<u64> {
    let fail = |why: String| syn::Error::new(lit.span(), why);
    let millis = parse_duration(&lit.value()).map_err(fail)?;
    if millis == 0 {
        return Err(fail("the duration must be greater than zero".into()));
    }
    Ok(millis)
}

/// Why a lease under a second is refused. The engine renews a lease every
/// third of it; with a durable store's round trips taking milliseconds, a
/// shorter one can lapse under a handler still running and let a duplicate
/// run it again.
const LEASE_TOO_SHORT: &str = "the lease must be at least \"1s\": it is renewed every third of it while the handler runs, and a shorter one can lapse between renewals and let a duplicate run the handler again";
/// Why a TTL under a second is refused: the engine would raise it to a
/// second, and a silent change is worse than an error.
const TTL_TOO_SHORT: &str = "the ttl must be at least \"1s\": it is how long a finished response is replayed, and a shorter one would be raised to a second";

/// The duration in `lit`, in milliseconds, refused with `why` under a
/// second (the shortest TTL or lease an `Endpoint` takes).
fn at_least_a_second(lit: &LitStr, why: &str) -> syn::Result<u64> {
    let millis = duration_millis(lit)?;
    if millis < 1_000 {
        return Err(syn::Error::new(lit.span(), why));
    }
    Ok(millis)
}

fn parse_duration(text: &str) -> Result<u64, String> {
    let usage = "expected a duration such as \"500ms\", \"90s\", \"15m\", \"24h\" or \"7d\"";
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(format!("empty duration; {usage}"));
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (number, tail) = rest.split_at(digits);
        let units = tail.len()
            - tail
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .len();
        let (unit, tail) = tail.split_at(units);
        let scale = unit_millis(unit)
            .filter(|_| !number.is_empty())
            .ok_or_else(|| format!("invalid duration `{text}`; {usage}"))?;
        let term = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(scale))
            .and_then(|term| total.checked_add(term));
        total = term.ok_or_else(|| format!("the duration `{text}` is too long"))?;
        rest = tail.trim_start();
    }
    Ok(total)
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

/// Status ranges in a literal like `"200-299, 404"` or `"2xx, 404"`.
fn status_ranges(lit: &LitStr) -> syn::Result<Vec<(u16, u16)>> {
    let value = lit.value();
    let ranges: Result<Vec<_>, String> = value
        .split(',')
        .map(|part| status_range(part.trim()))
        .collect();
    match ranges {
        Ok(ranges) => Ok(ranges),
        Err(why) => Err(syn::Error::new(
            lit.span(),
            format!("{why}; expected statuses and ranges such as \"200-299, 404\" or \"2xx, 404\""),
        )),
    }
}

fn status_range(part: &str) -> Result<(u16, u16), String> {
    if let Some(class) = part.strip_suffix("xx") {
        let first = status(&format!("{class}00"))?;
        return Ok((first, first + 99));
    }
    let (first, last) = match part.split_once('-') {
        Some((first, last)) => (status(first.trim())?, status(last.trim())?),
        None => (status(part)?, status(part)?),
    };
    if first > last {
        return Err(format!("the range `{part}` is empty"));
    }
    Ok((first, last))
}

fn status(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(code @ 100..=599) => Ok(code),
        _ if text.is_empty() => Err("a status is missing".into()),
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
        assert!(parse_duration("24x").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn statuses() {
        assert_eq!(status_range("2xx"), Ok((200, 299)));
        assert_eq!(status_range("404"), Ok((404, 404)));
        assert_eq!(status_range("400 - 403"), Ok((400, 403)));
        assert!(status_range("299-200").is_err());
        assert!(status_range("600").is_err());
        assert!(status_range("").is_err());
    }

    #[test]
    fn unknown_options_get_a_hint_when_close() {
        assert!(unknown_option("scopes").contains("did you mean `scope`?"));
        assert!(unknown_option("optinal").contains("did you mean `optional`?"));
        assert!(!unknown_option("retries").contains("did you mean"));
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn header_names() {
        assert_eq!(header_name("X-Tenant"), Ok("x-tenant".into()));
        assert!(header_name("x tenant").is_err());
        assert!(header_name("").is_err());
    }
}
