//! Multi-row statements with bound values.

use sqlx::{Any, Transaction};

use super::{RegistryQueryError, query_error};

/// Bound parameters per multi-row statement. Both databases allow far more (32,766 and
/// 65,535), but SQLite resolves `$N` names by a linear search, so a statement's parse
/// time grows with the square of its parameters.
pub(super) const BIND_PARAMETERS_MAX: usize = 1_000;

/// A value bound into a multi-row statement.
#[derive(Clone, Debug)]
pub(super) enum Bind {
    Text(String),
    Int(i64),
    Real(f64),
    Blob(Vec<u8>),
    NullText,
    NullInt,
    NullBlob,
}

/// Inserts `values` (row after row, `width` per row) with as few statements as the bind
/// limit allows: `{prefix} ($1, $2), ($3, $4)…`. Returns the rows affected.
pub(super) async fn insert_rows(
    tx: &mut Transaction<'static, Any>,
    prefix: &str,
    width: usize,
    values: Vec<Bind>,
    operation: &'static str,
) -> Result<u64, RegistryQueryError> {
    debug_assert!(width > 0 && values.len() % width == 0);
    let rows_per_statement = (BIND_PARAMETERS_MAX / width).max(1);
    let mut affected = 0;
    for chunk in values.chunks(rows_per_statement * width) {
        let rows = chunk.len() / width;
        let mut sql = String::with_capacity(prefix.len() + rows * width * 6);
        sql.push_str(prefix);
        sql.push(' ');
        for row in 0..rows {
            if row > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for column in 0..width {
                if column > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("${}", row * width + column + 1));
            }
            sql.push(')');
        }
        let mut statement = sqlx::query(&sql);
        for value in chunk {
            statement = bind(statement, value.clone());
        }
        affected += statement.execute(&mut **tx).await.map_err(query_error(operation))?.rows_affected();
    }
    Ok(affected)
}

pub(super) fn bind<'q>(
    statement: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    value: Bind,
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    match value {
        Bind::Text(text) => statement.bind(text),
        Bind::Int(int) => statement.bind(int),
        Bind::Real(real) => statement.bind(real),
        Bind::Blob(blob) => statement.bind(blob),
        Bind::NullText => statement.bind(None::<String>),
        Bind::NullInt => statement.bind(None::<i64>),
        Bind::NullBlob => statement.bind(None::<Vec<u8>>),
    }
}

/// Placeholders `$first, …, $(first + count - 1)`, comma-separated.
pub(crate) fn placeholders(first: usize, count: usize) -> String {
    (first..first + count).map(|n| format!("${n}")).collect::<Vec<_>>().join(", ")
}
