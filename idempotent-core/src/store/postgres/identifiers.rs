//! Names of roles and databases written into the SQL that error messages
//! suggest, so that the statement runs when pasted and names that role or
//! database and no other.

/// `name` (a role's or a database's, exactly as the server knows it) as an
/// SQL identifier: in double quotes, each quote doubled. Always quoted,
/// like the table and schema names the messages suggest, rather than only
/// where PostgreSQL would misread it bare: `user` (a reserved word),
/// `Mixed` (folded to `mixed`) or `svc-payments` (split at the `-`), and
/// the keywords differ between server versions.
pub(super) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_quoted_exactly_as_the_server_knows_it() {
        assert_eq!(quote_ident("app_rw2"), "\"app_rw2\"");
        assert_eq!(quote_ident("user"), "\"user\"");
        assert_eq!(quote_ident("App"), "\"App\"");
        assert_eq!(quote_ident("svc-payments"), "\"svc-payments\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
