//! Set-based statements over many rows of one table, the same SQL on PostgreSQL and SQLite: an INSERT of many
//! rows (optionally an upsert), and an UPDATE of many rows, each by its key and, for versioned rows, only at its
//! expected version (a compare-and-set of every row in one statement).

use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveModelTrait, ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, EntityTrait,
    IdenStatic, IntoActiveModel, Iterable, Statement, Value,
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

/// Inserts `rows` (upserting with `upsert` when given) in as few statements as the bind-parameter limit allows;
/// returns how many rows were written.
pub(super) async fn insert_rows<E, M, C>(
    txn: &C,
    rows: Vec<M>,
    upsert: Option<OnConflict>,
) -> Result<u64, DbErr>
where
    C: ConnectionTrait,
    E: EntityTrait,
    M: IntoActiveModel<E::ActiveModel> + Send,
    E::ActiveModel: Send,
{
    let per_row = <E::Column as Iterable>::iter().count().max(1);
    let limit = MAX_BIND_PARAMS / per_row;
    let mut left = rows.len();
    let mut rows = rows.into_iter();
    let mut written = 0;
    while left > 0 {
        let chunk = power_of_two_chunk(left, limit);
        left -= chunk;
        let part: Vec<E::ActiveModel> = rows
            .by_ref()
            .take(chunk)
            .map(IntoActiveModel::into_active_model)
            .collect();
        let mut insert = E::insert_many(part);
        if let Some(upsert) = &upsert {
            insert = insert.on_conflict(upsert.clone());
        }
        written += insert.exec_without_returning(txn).await?;
    }
    Ok(written)
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
    let table = E::default().table_name().to_owned();
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
        let tuples: Vec<String> = (0..size)
            .map(|t| {
                let marks: Vec<String> = (t * width..(t + 1) * width)
                    .map(|i| placeholder(backend, i + 1))
                    .collect();
                format!("({})", marks.join(", "))
            })
            .collect();
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
        let sql = format!(
            "UPDATE \"{table}\" SET {} FROM (VALUES {}) AS v WHERE {}",
            sets.join(", "),
            tuples.join(", "),
            filters.join(" AND ")
        );
        let result = txn
            .execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?;
        updated += result.rows_affected();
    }
    Ok(updated)
}

fn placeholder(backend: DbBackend, n: usize) -> String {
    match backend {
        DbBackend::Postgres => format!("${n}"),
        _ => "?".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::power_of_two_chunk;

    #[test]
    fn chunks_are_powers_of_two_within_the_limit() {
        assert_eq!(power_of_two_chunk(1, 100), 1);
        assert_eq!(power_of_two_chunk(7, 100), 4);
        assert_eq!(power_of_two_chunk(8, 100), 8);
        assert_eq!(power_of_two_chunk(1000, 100), 64);
        assert_eq!(power_of_two_chunk(5, 0), 1);
    }
}
