//! Listing records: the filter / order / cursor / select / count syntax of
//! the API, parsed against the resource's schema and turned into one
//! parameterised SQL statement. Field paths become SQL only through
//! [`schemas::field_expr`] (schema-declared, plain names); every value is a
//! bound parameter.
//!
//! Cursors are keyset-based: they carry the last row's sort values and id,
//! so pages stay stable under concurrent writes.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::DateTime;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgPool, Postgres, QueryBuilder, Row};

use super::StorageError;
use super::records::{Record, Target};
use super::schemas::field_expr;
use crate::catalog::{CompiledSchema, FieldType};

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 1000;

/// A query the client got wrong; the message says what to fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

fn bad(msg: impl Into<String>) -> QueryError {
    QueryError(msg.into())
}

/// Something a filter or sort can name.
#[derive(Debug, Clone)]
struct Column {
    name: String,
    expr: String,
    cast: &'static str,
}

impl Column {
    fn resolve(name: &str, schema: &CompiledSchema) -> Result<Self, QueryError> {
        let meta = match name {
            "id" => Some(("id", "text")),
            "createdAt" => Some(("created_at", "timestamptz")),
            "updatedAt" => Some(("updated_at", "timestamptz")),
            "version" => Some(("version", "bigint")),
            _ => None,
        };
        if let Some((expr, cast)) = meta {
            return Ok(Self {
                name: name.to_owned(),
                expr: expr.to_owned(),
                cast,
            });
        }
        let path = name.strip_prefix("data.").unwrap_or(name);
        let field = schema.field(path).ok_or_else(|| {
            bad(format!(
                "unknown field {name:?}: filter and sort on id, createdAt, updatedAt, version \
                 or a property declared in the resource's schema"
            ))
        })?;
        if field.encrypted {
            return Err(bad(format!(
                "field {name:?} is encrypted (x-encrypted) and cannot be filtered or sorted on"
            )));
        }
        let cast = match field.kind {
            FieldType::Numeric => "numeric",
            FieldType::Boolean => "boolean",
            FieldType::Text | FieldType::Other => "text",
        };
        Ok(Self {
            name: name.to_owned(),
            expr: field_expr(&field.path, field.kind),
            cast,
        })
    }

    /// Checks that a filter value parses as the column's type.
    fn check_value(&self, v: &str) -> Result<(), QueryError> {
        let ok = match self.cast {
            "numeric" => v.parse::<f64>().is_ok_and(f64::is_finite),
            "bigint" => v.parse::<i64>().is_ok(),
            "boolean" => v == "true" || v == "false",
            "timestamptz" => DateTime::parse_from_rfc3339(v).is_ok(),
            _ => true,
        };
        if ok {
            Ok(())
        } else {
            Err(bad(format!(
                "value {v:?} for {} is not a valid {}",
                self.name,
                match self.cast {
                    "timestamptz" => "RFC 3339 timestamp",
                    "bigint" => "integer",
                    other => other,
                }
            )))
        }
    }
}

#[derive(Debug)]
enum Filter {
    Compare(Column, &'static str, String),
    Like(Column, &'static str, String),
    In(Column, Vec<String>),
    Is(Column, &'static str),
}

#[derive(Debug)]
struct SortTerm {
    column: Column,
    desc: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Cursor {
    /// The order the cursor was made for.
    o: String,
    /// The last row's sort values, as text.
    k: Vec<Option<String>>,
}

/// A parsed list request.
#[derive(Debug)]
pub struct ListQuery {
    filters: Vec<Filter>,
    order: Vec<SortTerm>,
    order_key: String,
    limit: i64,
    cursor: Option<Cursor>,
    pub select: Option<Vec<String>>,
    pub count: bool,
}

/// One page of results.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<Record>,
    pub next_cursor: Option<String>,
    pub total: Option<i64>,
}

impl ListQuery {
    pub fn parse(params: &[(String, String)], schema: &CompiledSchema) -> Result<Self, QueryError> {
        let mut q = Self {
            filters: vec![],
            order: vec![],
            order_key: String::new(),
            limit: DEFAULT_LIMIT,
            cursor: None,
            select: None,
            count: false,
        };
        let mut order_param = None;
        let mut cursor_param = None;
        for (key, value) in params {
            match key.as_str() {
                "order" => order_param = Some(value.as_str()),
                "cursor" => cursor_param = Some(value.as_str()),
                "limit" => q.limit = parse_limit(value)?,
                "select" => q.select = Some(parse_select(value)?),
                "count" if value == "exact" => q.count = true,
                "count" => return Err(bad("count must be \"exact\"")),
                _ => q.filters.push(parse_filter(key, value, schema)?),
            }
        }
        q.order = parse_order(order_param.unwrap_or("createdAt.asc"), schema)?;
        if !q.order.iter().any(|t| t.column.expr == "id") {
            q.order.push(SortTerm {
                column: Column::resolve("id", schema)?,
                desc: false,
            });
        }
        q.order_key = q
            .order
            .iter()
            .map(|t| format!("{}.{}", t.column.name, if t.desc { "desc" } else { "asc" }))
            .collect::<Vec<_>>()
            .join(",");
        if let Some(c) = cursor_param {
            q.cursor = Some(q.decode_cursor(c)?);
        }
        Ok(q)
    }

    fn decode_cursor(&self, c: &str) -> Result<Cursor, QueryError> {
        let invalid = || bad("invalid cursor: pass back nextCursor exactly as received");
        let bytes = URL_SAFE_NO_PAD.decode(c).map_err(|_| invalid())?;
        let cursor: Cursor = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
        if cursor.o != self.order_key || cursor.k.len() != self.order.len() {
            return Err(bad(
                "this cursor was made for a different order; repeat the order of the first page",
            ));
        }
        for (term, v) in self.order.iter().zip(&cursor.k) {
            if let Some(v) = v {
                term.column.check_value(v).map_err(|_| invalid())?;
            }
        }
        Ok(cursor)
    }

    fn push_filters(&self, b: &mut QueryBuilder<'_, Postgres>) {
        for f in &self.filters {
            b.push(" AND ");
            match f {
                Filter::Compare(c, op, v) => {
                    b.push(format!("{} {op} ", c.expr))
                        .push_bind(v.clone())
                        .push(format!("::{}", c.cast));
                }
                Filter::Like(c, op, v) => {
                    b.push(format!("{} {op} ", c.expr)).push_bind(v.clone());
                }
                Filter::In(c, vs) => {
                    b.push(format!("{} = ANY(", c.expr))
                        .push_bind(vs.clone())
                        .push(format!("::{}[])", c.cast));
                }
                Filter::Is(c, what) => {
                    b.push(format!("{} IS {what}", c.expr));
                }
            }
        }
    }

    /// `(t1 after v1) OR (t1 = v1 AND t2 after v2) OR …`, nulls sorting last.
    fn push_keyset(&self, b: &mut QueryBuilder<'_, Postgres>, cursor: &Cursor) {
        b.push(" AND (");
        for i in 0..self.order.len() {
            if i > 0 {
                b.push(" OR ");
            }
            b.push("(TRUE");
            for j in 0..i {
                let c = &self.order[j].column;
                match &cursor.k[j] {
                    Some(v) => {
                        b.push(format!(" AND {} = ", c.expr))
                            .push_bind(v.clone())
                            .push(format!("::{}", c.cast));
                    }
                    None => {
                        b.push(format!(" AND {} IS NULL", c.expr));
                    }
                }
            }
            let term = &self.order[i];
            match &cursor.k[i] {
                Some(v) => {
                    let op = if term.desc { "<" } else { ">" };
                    b.push(format!(" AND ({} {op} ", term.column.expr))
                        .push_bind(v.clone())
                        .push(format!(
                            "::{} OR {} IS NULL)",
                            term.column.cast, term.column.expr
                        ));
                }
                None => {
                    b.push(" AND FALSE");
                }
            }
            b.push(")");
        }
        b.push(")");
    }

    pub async fn run(&self, pool: &PgPool, t: Target<'_>) -> Result<Page, StorageError> {
        let table = t.resource.table_in(t.tenant);
        let mut b =
            QueryBuilder::<Postgres>::new("SELECT id, version, created_at, updated_at, data");
        for (i, term) in self.order.iter().enumerate() {
            // JSON text form: RFC 3339 timestamps, plain numbers and booleans.
            b.push(format!(
                ", to_jsonb({}) #>> '{{}}' AS k{i}",
                term.column.expr
            ));
        }
        b.push(format!(" FROM {table} WHERE TRUE"));
        self.push_filters(&mut b);
        if let Some(cursor) = &self.cursor {
            self.push_keyset(&mut b, cursor);
        }
        let order: Vec<String> = self
            .order
            .iter()
            .map(|t| {
                format!(
                    "{} {} NULLS LAST",
                    t.column.expr,
                    if t.desc { "DESC" } else { "ASC" }
                )
            })
            .collect();
        b.push(format!(
            " ORDER BY {} LIMIT {}",
            order.join(", "),
            self.limit + 1
        ));
        let rows = b.build().fetch_all(pool).await.map_err(map_query_err)?;

        let more = rows.len() as i64 > self.limit;
        let mut items = Vec::with_capacity(rows.len());
        let mut last_keys = None;
        for row in rows.iter().take(self.limit as usize) {
            items.push(Record {
                id: row.try_get("id")?,
                resource: t.resource.as_str().to_owned(),
                version: row.try_get("version")?,
                created_at: row.try_get("created_at")?,
                updated_at: row.try_get("updated_at")?,
                data: row.try_get("data")?,
                audit: None,
            });
            let keys: Vec<Option<String>> = (0..self.order.len())
                .map(|i| row.try_get(format!("k{i}").as_str()))
                .collect::<Result<_, _>>()?;
            last_keys = Some(keys);
        }
        let next_cursor = match (more, last_keys) {
            (true, Some(k)) => {
                let c = Cursor {
                    o: self.order_key.clone(),
                    k,
                };
                Some(URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap_or_default()))
            }
            _ => None,
        };
        let total = if self.count {
            let mut cb =
                QueryBuilder::<Postgres>::new(format!("SELECT count(*) FROM {table} WHERE TRUE"));
            self.push_filters(&mut cb);
            let (n,): (i64,) = cb
                .build_query_as()
                .fetch_one(pool)
                .await
                .map_err(map_query_err)?;
            Some(n)
        } else {
            None
        };
        Ok(Page {
            items,
            next_cursor,
            total,
        })
    }
}

fn map_query_err(e: sqlx::Error) -> StorageError {
    match super::pg_code(&e).as_deref() {
        Some("42P01") => StorageError::NotFound("resource not found".into()),
        // A value PostgreSQL could not read as the field's type (checked
        // beforehand, so only a tampered cursor gets here).
        Some("22P02" | "22007" | "22008" | "22003") => {
            StorageError::BadRequest("a query value does not fit its field's type".into())
        }
        _ => StorageError::from_tenant_query(e),
    }
}

fn parse_limit(v: &str) -> Result<i64, QueryError> {
    match v.parse::<i64>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(bad(format!(
            "limit must be an integer from 1 to {MAX_LIMIT}"
        ))),
    }
}

fn parse_select(v: &str) -> Result<Vec<String>, QueryError> {
    let fields: Vec<String> = v.split(',').map(|s| s.trim().to_owned()).collect();
    for f in &fields {
        let top = f.split('.').next().unwrap_or_default();
        let ok = matches!(
            top,
            "id" | "resource" | "version" | "createdAt" | "updatedAt" | "data"
        ) && (top == "data" || !f.contains('.'))
            && f.split('.').all(|seg| !seg.is_empty());
        if !ok {
            return Err(bad(format!(
                "cannot select {f:?}: select id, resource, version, createdAt, updatedAt, data or data.<path>"
            )));
        }
    }
    Ok(fields)
}

fn parse_order(v: &str, schema: &CompiledSchema) -> Result<Vec<SortTerm>, QueryError> {
    let mut terms = Vec::new();
    for part in v.split(',') {
        let (name, dir) = match part.rsplit_once('.') {
            Some((n, "asc")) => (n, false),
            Some((n, "desc")) => (n, true),
            _ => (part, false),
        };
        terms.push(SortTerm {
            column: Column::resolve(name, schema)?,
            desc: dir,
        });
    }
    if terms.len() > 8 {
        return Err(bad("order takes at most 8 fields"));
    }
    Ok(terms)
}

fn parse_filter(key: &str, value: &str, schema: &CompiledSchema) -> Result<Filter, QueryError> {
    let column = Column::resolve(key, schema)?;
    let (op, arg) = value.split_once('.').ok_or_else(|| {
        bad(format!(
            "filter {key}={value:?} must look like {key}=<op>.<value>, e.g. {key}=eq.42"
        ))
    })?;
    let compare = |sql_op: &'static str| -> Result<Filter, QueryError> {
        column.check_value(arg)?;
        Ok(Filter::Compare(column.clone(), sql_op, arg.to_owned()))
    };
    match op {
        "eq" => compare("="),
        "neq" => compare("<>"),
        "gt" => compare(">"),
        "gte" => compare(">="),
        "lt" => compare("<"),
        "lte" => compare("<="),
        "like" | "ilike" => {
            if column.cast != "text" {
                return Err(bad(format!(
                    "{op} applies to text fields; {key} is not text"
                )));
            }
            let pattern = arg.replace('*', "%");
            Ok(Filter::Like(
                column,
                if op == "like" { "LIKE" } else { "ILIKE" },
                pattern,
            ))
        }
        "in" => {
            let inner = arg
                .strip_prefix('(')
                .and_then(|a| a.strip_suffix(')'))
                .ok_or_else(|| bad(format!("in takes a list: {key}=in.(a,b)")))?;
            let values: Vec<String> = inner.split(',').map(|s| s.trim().to_owned()).collect();
            for v in &values {
                column.check_value(v)?;
            }
            Ok(Filter::In(column, values))
        }
        "is" => {
            let what = match arg {
                "null" => "NULL",
                "notnull" => "NOT NULL",
                "true" if column.cast == "boolean" => "TRUE",
                "false" if column.cast == "boolean" => "FALSE",
                _ => {
                    return Err(bad(format!(
                        "is takes null or notnull (or true/false on boolean fields), not {arg:?}"
                    )));
                }
            };
            Ok(Filter::Is(column, what))
        }
        other => Err(bad(format!(
            "unknown operator {other:?} in {key}: use eq, neq, gt, gte, lt, lte, like, ilike, in or is"
        ))),
    }
}

/// Keeps only the selected fields of a serialized record.
pub fn project(record: &Value, select: &[String]) -> Value {
    let mut out = Value::Object(Default::default());
    for field in select {
        let path: Vec<&str> = field.split('.').collect();
        if let Some(v) = path.iter().try_fold(record, |v, seg| v.get(seg)) {
            insert_at(&mut out, &path, v.clone());
        }
    }
    out
}

fn insert_at(target: &mut Value, path: &[&str], value: Value) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let Value::Object(map) = target else { return };
    if rest.is_empty() {
        map.insert((*first).to_owned(), value);
    } else {
        let child = map
            .entry((*first).to_owned())
            .or_insert_with(|| Value::Object(Default::default()));
        insert_at(child, rest, value);
    }
}
