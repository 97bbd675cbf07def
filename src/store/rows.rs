//! Set-based statements over many rows of one table, the same SQL on PostgreSQL and SQLite: an INSERT of many
//! rows (optionally an upsert), and an UPDATE of many rows, each by its key and, for versioned rows, only at its
//! expected version (a compare-and-set of every row in one statement).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, DbErr,
    EntityTrait, IdenStatic, IntoActiveModel, Iterable, Statement, Value,
};

/// Bind parameters per statement we allow ourselves: under SQLite's 32,766 and PostgreSQL's 65,535.
const MAX_BIND_PARAMS: usize = 30_000;

/// Every distinct statement text is prepared and cached on each pooled connection (by the driver, and by the
/// server), so a statement over `n` rows must not come in every size `n`: statements cover a power of two of rows.
/// The largest power of two of at most `rows` rows and at most `limit` (≥ 1) rows.
fn power_of_two_chunk(rows: usize, limit: usize) -> usize {
    let cap = rows.min(limit).max(1);
    1 << (usize::BITS - 1 - cap.leading_zeros())
}

/// What an INSERT does with a row whose key is already taken.
pub(super) struct OnKey<C: 'static> {
    /// The columns of the unique key.
    pub(super) keys: &'static [C],
    /// The columns overwritten from the new row; none leaves the stored row alone (DO NOTHING).
    pub(super) update: &'static [C],
}

/// Inserts `rows` (on a taken key, doing what `on_key` says) in as few statements as the bind-parameter limit
/// allows; returns how many rows were written. Every row must set the same columns.
pub(super) async fn insert_rows<E, M, C>(
    txn: &C,
    rows: Vec<M>,
    on_key: Option<&OnKey<E::Column>>,
) -> Result<u64, DbErr>
where
    C: ConnectionTrait,
    E: EntityTrait,
    M: IntoActiveModel<E::ActiveModel> + Send,
{
    let mut rows = rows.into_iter().map(IntoActiveModel::into_active_model);
    let Some(first) = rows.next() else {
        return Ok(0);
    };
    // The columns the rows set (a generated id is left to the database).
    let columns: Vec<E::Column> = <E::Column as Iterable>::iter()
        .filter(|c| !first.get(*c).is_not_set())
        .collect();
    let width = columns.len().max(1);
    let limit = MAX_BIND_PARAMS / width;
    let backend = txn.get_database_backend();
    let table = E::default().table_name();
    let mut left = rows.len() + 1;
    let mut rows = std::iter::once(first).chain(rows);
    let mut written = 0;
    while left > 0 {
        let chunk = power_of_two_chunk(left, limit);
        left -= chunk;
        let mut values = Vec::with_capacity(chunk * width);
        for row in rows.by_ref().take(chunk) {
            for col in &columns {
                match row.get(*col).into_value() {
                    Some(value) => values.push(value),
                    None => {
                        return Err(DbErr::Custom(format!(
                            "a row for {table} leaves {} unset where the others set it",
                            col.as_str()
                        )))
                    }
                }
            }
        }
        let (keys, update) = on_key.map_or((&[][..], &[][..]), |k| (k.keys, k.update));
        let key = TextKey::new(
            backend,
            table,
            TextKind::Insert {
                on_conflict: on_key.is_some(),
            },
            chunk,
            &columns,
            keys,
            update,
        );
        let text = || insert_text(backend, table, &columns, chunk, on_key);
        written += execute_shape(txn, key, text, values).await?;
    }
    Ok(written)
}

fn insert_text<C: ColumnTrait>(
    backend: DbBackend,
    table: &str,
    columns: &[C],
    rows: usize,
    on_key: Option<&OnKey<C>>,
) -> String {
    let mut sql = format!(
        "INSERT INTO \"{table}\" ({}) VALUES {}",
        quoted(columns),
        tuples(backend, rows, columns.len())
    );
    if let Some(on_key) = on_key {
        sql.push_str(&format!(" ON CONFLICT ({}) DO ", quoted(on_key.keys)));
        if on_key.update.is_empty() {
            sql.push_str("NOTHING");
        } else {
            let sets: Vec<String> = on_key
                .update
                .iter()
                .map(|c| format!("\"{0}\" = excluded.\"{0}\"", c.as_str()))
                .collect();
            sql.push_str(&format!("UPDATE SET {}", sets.join(", ")));
        }
    }
    sql
}

/// `rows` tuples of `width` bind parameters each, numbered from 1.
fn tuples(backend: DbBackend, rows: usize, width: usize) -> String {
    let tuples: Vec<String> = (0..rows)
        .map(|t| {
            let marks: Vec<String> = (t * width..(t + 1) * width)
                .map(|i| placeholder(backend, i + 1))
                .collect();
            format!("({})", marks.join(", "))
        })
        .collect();
    tuples.join(", ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum TextKind {
    Insert { on_conflict: bool },
    Update { versioned: bool },
}

/// Everything a statement text depends on. Columns are given by their position in the entity (all our entities
/// have far fewer than 64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TextKey {
    postgres: bool,
    table: &'static str,
    kind: TextKind,
    rows: usize,
    columns: u64,
    keys: u64,
    update: u64,
}

impl TextKey {
    fn new<C: ColumnTrait + Iterable>(
        backend: DbBackend,
        table: &'static str,
        kind: TextKind,
        rows: usize,
        columns: &[C],
        keys: &[C],
        update: &[C],
    ) -> Self {
        Self {
            postgres: backend == DbBackend::Postgres,
            table,
            kind,
            rows,
            columns: mask(columns),
            keys: mask(keys),
            update: mask(update),
        }
    }
}

/// `"a", "b", …`
fn quoted<C: ColumnTrait>(columns: &[C]) -> String {
    let names: Vec<String> = columns
        .iter()
        .map(|c| format!("\"{}\"", c.as_str()))
        .collect();
    names.join(", ")
}

fn mask<C: ColumnTrait + Iterable>(columns: &[C]) -> u64 {
    C::iter()
        .enumerate()
        .filter(|(_, c)| columns.iter().any(|x| x.as_str() == c.as_str()))
        .fold(0, |m, (i, _)| m | 1u64 << (i % 64))
}

/// Runs the statement of shape `key` (its text built by `build` the first time) with `values`; returns how many
/// rows it affected.
async fn execute_shape<C: ConnectionTrait>(
    txn: &C,
    key: TextKey,
    build: impl FnOnce() -> String,
    values: Vec<Value>,
) -> Result<u64, DbErr> {
    let backend = txn.get_database_backend();
    let sql = statement_text(key, build);
    let result = txn
        .execute_raw(Statement::from_sql_and_values(
            backend,
            sql.as_ref(),
            values,
        ))
        .await?;
    Ok(result.rows_affected())
}

/// The text of a statement shape, built once per process: building a 64-row statement's text (sea-query, then
/// `format!` of every placeholder) was a fifth of BOS's instructions in the spine. Shapes are bounded (tables ×
/// kinds × power-of-two row counts), and so is this map.
fn statement_text(key: TextKey, build: impl FnOnce() -> String) -> Arc<str> {
    static TEXTS: OnceLock<Mutex<HashMap<TextKey, Arc<str>>>> = OnceLock::new();
    let texts = TEXTS.get_or_init(Mutex::default);
    if let Some(text) = texts.lock().ok().and_then(|t| t.get(&key).cloned()) {
        return text;
    }
    let text: Arc<str> = build().into();
    if let Ok(mut texts) = texts.lock() {
        texts.insert(key, text.clone());
    }
    text
}

/// How `update_rows` finds and bumps the rows of one table.
pub(super) struct RowUpdate<C: 'static> {
    /// The columns that identify a row.
    pub(super) keys: &'static [C],
    /// Columns never written (a generated id).
    pub(super) fixed: &'static [C],
    /// The version column of a compare-and-set: a row is updated only at its expected version, and bumped by one.
    pub(super) version: Option<C>,
}

/// Updates every row of `rows` to its new values, each identified by `how.keys` and, for versioned tables, only
/// where the stored version is the given expected one; returns how many rows were updated (fewer than given means
/// a compare-and-set lost). One `UPDATE … FROM (VALUES …)` per chunk.
pub(super) async fn update_rows<E>(
    txn: &DatabaseTransaction,
    rows: Vec<(E::Model, i64)>,
    how: &RowUpdate<E::Column>,
) -> Result<u64, DbErr>
where
    E: EntityTrait,
    E::Model: IntoActiveModel<E::ActiveModel>,
{
    if rows.is_empty() {
        return Ok(0);
    }
    let is = |set: &[E::Column], col: &E::Column| set.iter().any(|c| c.as_str() == col.as_str());
    let written: Vec<E::Column> = <E::Column as Iterable>::iter()
        .filter(|c| {
            !is(how.keys, c)
                && !is(how.fixed, c)
                && how.version.map(|v| v.as_str()) != Some(c.as_str())
        })
        .collect();
    // The tuple of a row: its keys, its written columns, then its expected version.
    let tuple: Vec<E::Column> = how
        .keys
        .iter()
        .copied()
        .chain(written.iter().copied())
        .collect();
    let width = tuple.len() + usize::from(how.version.is_some());
    let limit = MAX_BIND_PARAMS / width;
    let backend = txn.get_database_backend();
    let table = E::default().table_name();
    let mut updated = 0;
    let mut rows = rows.into_iter();
    let mut left = rows.len();
    while left > 0 {
        // Padded up to a power of two with copies of the last tuple: a row that joins several identical tuples is
        // updated once, so the count of updated rows stays that of distinct rows.
        let chunk = power_of_two_chunk(left, limit);
        let size = if chunk < left && chunk * 2 <= limit {
            chunk * 2
        } else {
            chunk
        };
        let real = size.min(left);
        left -= real;
        let mut values = Vec::new();
        for (row, expected) in rows.by_ref().take(real) {
            let active = row.into_active_model();
            for col in &tuple {
                values.push(active.get(*col).into_value().unwrap_or(Value::Int(None)));
            }
            if how.version.is_some() {
                values.push(Value::BigInt(Some(expected)));
            }
        }
        let last = values[values.len() - width..].to_vec();
        for _ in real..size {
            values.extend(last.iter().cloned());
        }
        let key = TextKey::new(
            backend,
            table,
            TextKind::Update {
                versioned: how.version.is_some(),
            },
            size,
            &tuple,
            how.keys,
            &written,
        );
        let text = || update_text(backend, table, how, &written, size);
        updated += execute_shape(txn, key, text, values).await?;
    }
    Ok(updated)
}

fn update_text<C: ColumnTrait>(
    backend: DbBackend,
    table: &str,
    how: &RowUpdate<C>,
    written: &[C],
    rows: usize,
) -> String {
    let width = how.keys.len() + written.len() + usize::from(how.version.is_some());
    // VALUES columns are named column1, column2, … on both backends.
    let mut sets: Vec<String> = written
        .iter()
        .enumerate()
        .map(|(i, c)| format!("\"{}\" = v.column{}", c.as_str(), how.keys.len() + i + 1))
        .collect();
    let mut filters: Vec<String> = how
        .keys
        .iter()
        .enumerate()
        .map(|(i, c)| format!("\"{table}\".\"{}\" = v.column{}", c.as_str(), i + 1))
        .collect();
    if let Some(version) = how.version {
        let v = version.as_str();
        sets.push(format!("\"{v}\" = v.column{width} + 1"));
        filters.push(format!("\"{table}\".\"{v}\" = v.column{width}"));
    }
    format!(
        "UPDATE \"{table}\" SET {} FROM (VALUES {}) AS v WHERE {}",
        sets.join(", "),
        tuples(backend, rows, width),
        filters.join(" AND ")
    )
}

fn placeholder(backend: DbBackend, n: usize) -> String {
    match backend {
        DbBackend::Postgres => format!("${n}"),
        _ => "?".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::DbBackend;

    use super::{insert_text, power_of_two_chunk, statement_text, OnKey, TextKey, TextKind};
    use crate::store::entities::processed_events::Column;

    const ON_ID: OnKey<Column> = OnKey {
        keys: &[Column::EventId],
        update: &[Column::ProcessedAt],
    };

    #[test]
    fn insert_texts_number_every_row_and_name_the_conflict() {
        let columns = [Column::EventId, Column::ProcessedAt];
        assert_eq!(
            insert_text(DbBackend::Postgres, "t", &columns, 2, Some(&ON_ID)),
            "INSERT INTO \"t\" (\"event_id\", \"processed_at\") VALUES ($1, $2), ($3, $4) \
             ON CONFLICT (\"event_id\") DO UPDATE SET \"processed_at\" = excluded.\"processed_at\""
        );
        let nothing = OnKey {
            keys: &[Column::EventId],
            update: &[],
        };
        assert_eq!(
            insert_text(DbBackend::Sqlite, "t", &columns, 1, Some(&nothing)),
            "INSERT INTO \"t\" (\"event_id\", \"processed_at\") VALUES (?, ?) ON CONFLICT (\"event_id\") DO NOTHING"
        );
    }

    #[test]
    fn statement_texts_are_built_once_per_shape() {
        let columns = [Column::EventId, Column::ProcessedAt];
        let key = |rows| {
            TextKey::new(
                DbBackend::Postgres,
                "rows_test",
                TextKind::Insert { on_conflict: true },
                rows,
                &columns,
                ON_ID.keys,
                ON_ID.update,
            )
        };
        let first = statement_text(key(4), || "four".to_owned());
        let again = statement_text(key(4), || panic!("built twice"));
        assert!(std::sync::Arc::ptr_eq(&first, &again));
        let other = statement_text(key(8), || "eight".to_owned());
        assert_eq!(other.as_ref(), "eight");
    }

    #[test]
    fn chunks_are_powers_of_two_within_the_limit() {
        assert_eq!(power_of_two_chunk(1, 100), 1);
        assert_eq!(power_of_two_chunk(7, 100), 4);
        assert_eq!(power_of_two_chunk(8, 100), 8);
        assert_eq!(power_of_two_chunk(1000, 100), 64);
        assert_eq!(power_of_two_chunk(5, 0), 1);
    }
}
