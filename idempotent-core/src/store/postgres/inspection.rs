//! The query `PostgresStore::migrate` looks at an existing table with,
//! written for the server's version: catalog columns that older servers
//! lack are left out where they could not matter.

use super::COLUMNS;
use crate::store::sql;

/// The catalog expressions that differ between PostgreSQL versions, each
/// valid on the version it was chosen for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Catalog {
    /// Whether `pg_attribute` row `a` is not a generated column
    /// (`attgenerated`, PostgreSQL 12; none before).
    not_generated: &'static str,
    /// Whether `pg_attribute` row `a` is not an identity column
    /// (`attidentity`, PostgreSQL 10; none before).
    not_identity: &'static str,
    /// Whether `pg_collation` row `c` compares other than byte for byte
    /// (`collisdeterministic`, PostgreSQL 12; every collation was
    /// deterministic before).
    nondeterministic: &'static str,
    /// How many of `pg_index` row `i`'s columns are its key, the rest
    /// being `INCLUDE`d (`indnkeyatts`, PostgreSQL 11; all were keys
    /// before).
    key_columns: &'static str,
    /// Whether `pg_index` row `i` counts NULLs as distinct
    /// (`indnullsnotdistinct`, PostgreSQL 15; they always were before).
    nulls_distinct: &'static str,
}

impl Catalog {
    /// The expressions for the server whose `server_version_num` is
    /// `version` (as 150002 for 15.2).
    pub(super) fn for_version(version: i32) -> Self {
        Self {
            not_generated: if version >= 120_000 {
                "a.attgenerated = ''"
            } else {
                "TRUE"
            },
            not_identity: if version >= 100_000 {
                "a.attidentity = ''"
            } else {
                "TRUE"
            },
            nondeterministic: if version >= 120_000 {
                "NOT c.collisdeterministic"
            } else {
                "FALSE"
            },
            key_columns: if version >= 110_000 {
                "i.indnkeyatts"
            } else {
                "i.indnatts"
            },
            nulls_distinct: if version >= 150_000 {
                "NOT i.indnullsnotdistinct"
            } else {
                "TRUE"
            },
        }
    }
}

/// The row [`inspection_sql`] reads: the table's column names and types,
/// whether an index is led by `expires_at`, whether one keys it on
/// `(scope, key)`, the privileges the role lacks on it, the role, whether
/// the server is in recovery, whether the role's transactions are
/// read-only, the columns a row must have a value in, a nondeterministic
/// collation `key` is compared by, and a unique index records can
/// collide on.
pub(super) type Inspected = (
    Vec<String>,
    Vec<String>,
    bool,
    bool,
    Vec<String>,
    String,
    bool,
    bool,
    Vec<String>,
    Option<String>,
    Option<String>,
);

/// The query that reads, in one row, what `migrate` judges the table
/// `table` (a checked name) by, on a server whose catalogs `catalog`
/// describes. The catalogs are readable by every role.
pub(super) fn inspection_sql(table: &str, catalog: Catalog) -> String {
    let Catalog {
        not_generated,
        not_identity,
        nondeterministic,
        key_columns,
        nulls_distinct,
    } = catalog;
    // The name is a checked identifier, safe in a string literal. Any
    // index led by `expires_at` serves the purge, whatever its name, so
    // one made by a migration tool of its own counts.
    format!(
        "SELECT
           ARRAY(SELECT attname::text FROM pg_attribute
                 WHERE attrelid = t.oid AND attnum > 0 AND NOT attisdropped ORDER BY attnum),
           ARRAY(SELECT format_type(atttypid, atttypmod) FROM pg_attribute
                 WHERE attrelid = t.oid AND attnum > 0 AND NOT attisdropped ORDER BY attnum),
           EXISTS (SELECT FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                   WHERE i.indrelid = t.oid AND a.attname = 'expires_at'),
           EXISTS (SELECT FROM pg_index i
                   WHERE i.indrelid = t.oid AND i.indisunique AND i.indimmediate
                     AND i.indisvalid AND i.indpred IS NULL AND {key_columns} = 2
                     AND ARRAY(SELECT attname::text FROM pg_attribute
                               WHERE attrelid = t.oid AND attnum IN (i.indkey[0], i.indkey[1])
                               ORDER BY attname) = ARRAY['key', 'scope']),
           ARRAY(SELECT p FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) AS p
                 WHERE NOT has_table_privilege(t.oid, p)),
           current_user::text,
           pg_is_in_recovery(),
           current_setting('transaction_read_only') = 'on',
           ARRAY(SELECT a.attname::text FROM pg_attribute a
                 WHERE a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
                   AND a.attnotnull AND NOT a.atthasdef AND {not_identity} AND {not_generated}),
           (SELECT c.collname::text FROM pg_collation c
            WHERE {nondeterministic}
              AND c.oid IN (SELECT attcollation FROM pg_attribute
                            WHERE attrelid = t.oid AND attname = 'key' AND NOT attisdropped
                            UNION ALL
                            SELECT i.indcollation[n] FROM pg_index i,
                                   generate_series(0, {key_columns} - 1) AS n
                            WHERE i.indrelid = t.oid AND i.indisunique
                              AND i.indkey[n] = (SELECT attnum FROM pg_attribute
                                                 WHERE attrelid = t.oid AND attname = 'key'))
            LIMIT 1),
           {colliding}
         FROM (SELECT to_regclass('{quoted}') AS oid) AS t",
        colliding = colliding_index(key_columns, nulls_distinct),
        quoted = sql::quoted(table),
    )
}

/// The name of a unique index of the table `t.oid` that two records can
/// collide on (see [`sql::check_unique_indexes`]), if there is one, or
/// of an exclusion constraint's index (`EXCLUDE USING btree (key WITH
/// =)`), which keeps records apart as a unique index does:
/// - it depends on none of the user's own columns, neither as a key
///   column nor in an expression or its predicate (which `pg_depend`
///   records, less the `INCLUDE`d columns, which keep no record apart);
/// - its key columns are not both `scope` and `key`;
/// - nor do they hold `lease_token` with NULLs distinct: a token is
///   random and one claim's own, and a stored response empties it.
fn colliding_index(key_columns: &str, nulls_distinct: &str) -> String {
    let columns = (COLUMNS.iter())
        .map(|(name, _)| format!("'{name}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let key_names = format!(
        "ARRAY(SELECT a.attname::text FROM generate_series(0, {key_columns} - 1) AS n
               JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = i.indkey[n])"
    );
    format!(
        "(SELECT x.relname::text FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid
          WHERE i.indrelid = t.oid AND (i.indisunique OR i.indisexclusion)
            AND NOT EXISTS (
                SELECT FROM pg_attribute a
                WHERE a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
                  AND a.attname <> ALL (ARRAY[{columns}])
                  AND (a.attnum IN (SELECT i.indkey[n] FROM generate_series(0, {key_columns} - 1) AS n)
                       OR (a.attnum NOT IN (SELECT i.indkey[n]
                                            FROM generate_series({key_columns}, i.indnatts - 1) AS n)
                           AND EXISTS (SELECT FROM pg_depend d
                                       WHERE d.classid = 'pg_class'::regclass
                                         AND d.objid = i.indexrelid
                                         AND d.refclassid = 'pg_class'::regclass
                                         AND d.refobjid = t.oid AND d.refobjsubid = a.attnum))))
            AND NOT {key_names} @> ARRAY['scope', 'key']
            AND NOT ({nulls_distinct} AND 'lease_token' = ANY ({key_names}))
          LIMIT 1)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_before_12_are_asked_for_no_column_they_lack() {
        for version in [90_600, 100_000, 110_022, 119_999] {
            let sql = inspection_sql("records", Catalog::for_version(version));
            for column in ["attgenerated", "collisdeterministic", "indnullsnotdistinct"] {
                assert!(!sql.contains(column), "{version} asked for {column}");
            }
        }
        let before_11 = inspection_sql("records", Catalog::for_version(100_023));
        assert!(!before_11.contains("indnkeyatts"));
        assert!(!inspection_sql("records", Catalog::for_version(90_624)).contains("attidentity"));
    }

    #[test]
    fn newer_servers_are_asked_for_what_they_have() {
        let on_12 = inspection_sql("records", Catalog::for_version(120_000));
        for column in [
            "attgenerated",
            "collisdeterministic",
            "indnkeyatts",
            "attidentity",
        ] {
            assert!(on_12.contains(column), "{column}");
        }
        assert!(!on_12.contains("indnullsnotdistinct"));
        let on_15 = inspection_sql("records", Catalog::for_version(150_002));
        assert!(on_15.contains("NOT i.indnullsnotdistinct"));
    }

    /// Each version's query runs on the server at hand (any of them is
    /// valid on a newer one) and reads the same of a table with a
    /// required column of the user's own and a unique index on `key`.
    #[tokio::test]
    async fn every_versions_query_runs() {
        use sqlx::Connection;
        let Ok(url) = std::env::var("IDEMPOTENT_TEST_POSTGRES_URL") else {
            assert!(
                std::env::var("IDEMPOTENT_REQUIRE_BACKENDS").as_deref() != Ok("1"),
                "IDEMPOTENT_TEST_POSTGRES_URL is not set"
            );
            return;
        };
        let mut connection = sqlx::PgConnection::connect(&url).await.expect("connect");
        // A temporary table: the connection's own, gone with it.
        let setup = "CREATE TEMPORARY TABLE inspected (
                         scope bytea NOT NULL, key text NOT NULL, tenant text NOT NULL,
                         PRIMARY KEY (scope, key));
                     CREATE UNIQUE INDEX inspected_key ON inspected (key);";
        sqlx::raw_sql(setup)
            .execute(&mut connection)
            .await
            .expect("setup");
        for version in [90_600, 100_000, 110_000, 120_000, 150_000] {
            let sql = inspection_sql("inspected", Catalog::for_version(version));
            let inspected: Inspected = sqlx::query_as(&sql)
                .fetch_one(&mut connection)
                .await
                .unwrap_or_else(|error| panic!("{version}: {error}"));
            assert_eq!(inspected.0, ["scope", "key", "tenant"], "{version}");
            assert!(inspected.3, "{version}: keyed");
            assert_eq!(inspected.8, ["scope", "key", "tenant"], "{version}");
            assert_eq!(inspected.10.as_deref(), Some("inspected_key"), "{version}");
        }
    }
}
