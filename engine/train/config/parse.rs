//! From TOML text + CLI overrides to a checked `toml::Table` holding only the keys titan uses.
//! Order: overrides are coerced (by the schema) and written into the parsed file; old spellings
//! are moved to their current names; then every section and key is checked against the schema.

use super::schema::{self, Kind, Use};
use crate::error::{Error, Result};
use toml::{Table, Value};

/// Applies torchtitan-style overrides: `--section.key value`, `--section.key=value`, a bare
/// `--section.flag` (= true) and `--section.no_flag` (= false).
pub(crate) fn apply_overrides(root: &mut Table, args: &[String]) -> Result<()> {
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let Some(body) = arg.strip_prefix("--") else {
            return Err(Error::Config(format!(
                "command line: unexpected argument '{arg}' (overrides look like --section.key value)"
            )));
        };
        let (path, inline) = match body.split_once('=') {
            Some((p, v)) => (p, Some(v.to_string())),
            None => (body, None),
        };
        let Some((section, key)) = schema::split_path(path) else {
            return Err(Error::Config(format!(
                "command line: '--{path}' is not of the form --section.key"
            )));
        };
        if !schema::is_section(section) {
            return Err(Error::Config(format!(
                "command line: unknown section in '--{path}'"
            )));
        }
        let (section, key, kind, negated) = resolve_override_key(section, key, path)?;
        let raw = match (inline, kind) {
            (Some(v), _) => v,
            (None, Kind::Bool) => match args.get(i).map(String::as_str) {
                Some(v @ ("true" | "false" | "True" | "False")) => {
                    i += 1;
                    v.to_string()
                }
                _ => "true".to_string(),
            },
            (None, _) => match args.get(i) {
                Some(v) => {
                    i += 1;
                    v.clone()
                }
                None => {
                    return Err(Error::Config(format!(
                        "command line: '--{path}' needs a value ({})",
                        kind.describe()
                    )))
                }
            },
        };
        let value = coerce_str(&raw, kind)
            .map_err(|why| Error::Config(format!("command line: '--{path}' {why}")))?;
        let value = match (negated, value) {
            (true, Some(Value::Boolean(b))) => Some(Value::Boolean(!b)),
            (_, v) => v,
        };
        // An override replaces the key under every spelling the file may have used.
        drop_aliases_elsewhere(root, &section, &key);
        let table = table_at(root, &section, "command line")?;
        match value {
            Some(v) => {
                table.insert(key, v);
            }
            None => {
                table.remove(&key);
            }
        }
    }
    Ok(())
}

/// Finds the schema entry for an override key, following aliases and the `no_` prefix.
fn resolve_override_key(
    section: &str,
    key: &str,
    path: &str,
) -> Result<(String, String, Kind, bool)> {
    let mut negated = false;
    let found = match schema::lookup(section, key) {
        Some(f) => Some((section.to_string(), key.to_string(), f)),
        None => key
            .strip_prefix("no_")
            .and_then(|k| match schema::lookup(section, k) {
                Some(f @ (Kind::Bool, _)) => {
                    negated = true;
                    Some((section.to_string(), k.to_string(), f))
                }
                _ => None,
            }),
    };
    let Some((mut s, mut k, (mut kind, u))) = found else {
        let hint = schema::suggest(section, key)
            .map(|h| format!(" (did you mean --{section}.{h}?)"))
            .unwrap_or_default();
        return Err(Error::Config(format!(
            "command line: unknown key '--{path}'{hint}"
        )));
    };
    if let Use::Alias(target) = u {
        let (ts, tk) = schema::split_path(target).expect("alias targets are section.key");
        kind = schema::lookup(ts, tk)
            .expect("alias targets are in the schema")
            .0;
        s = ts.to_string();
        k = tk.to_string();
    }
    Ok((s, k, kind, negated))
}

/// Removes old spellings of `section.key` that live in other sections (debug.seed -> training.seed).
fn drop_aliases_elsewhere(root: &mut Table, section: &str, key: &str) {
    for s in schema::SECTIONS {
        for &(old, _, u) in schema::section_keys(s) {
            if let Use::Alias(t) = u {
                if schema::split_path(t) == Some((section, key)) {
                    if let Some(Value::Table(tab)) = get_table_mut(root, s) {
                        tab.remove(old);
                    }
                }
            }
        }
    }
}

/// A CLI string -> TOML value of the schema's kind; `Ok(None)` clears an optional key.
fn coerce_str(raw: &str, kind: Kind) -> std::result::Result<Option<Value>, String> {
    let is_none = matches!(raw, "None" | "none" | "null");
    let bad = || format!("expects {}, got '{raw}'", kind.describe());
    Ok(Some(match kind {
        Kind::Bool => match raw {
            "true" | "True" | "1" => Value::Boolean(true),
            "false" | "False" | "0" => Value::Boolean(false),
            _ => return Err(bad()),
        },
        Kind::OptInt | Kind::OptFloat | Kind::OptStr if is_none => return Ok(None),
        Kind::Int | Kind::OptInt => Value::Integer(raw.trim().parse().map_err(|_| bad())?),
        Kind::Float | Kind::OptFloat => Value::Float(raw.trim().parse().map_err(|_| bad())?),
        Kind::Str | Kind::OptStr | Kind::StrOrInt => Value::String(raw.to_string()),
        Kind::StrList if raw.trim_start().starts_with('[') => parse_literal(raw).ok_or_else(bad)?,
        Kind::StrList => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        Kind::Any if is_none => return Ok(None),
        Kind::Any => parse_literal(raw).unwrap_or_else(|| Value::String(raw.to_string())),
    }))
}

/// Parses a TOML value literal ("[1, 2]", "3e-4", "\"x\"").
pub(crate) fn parse_literal(lit: &str) -> Option<Value> {
    let mut t: Table = toml::from_str(&format!("v = {lit}")).ok()?;
    t.remove("v")
}

fn get_table_mut<'a>(root: &'a mut Table, path: &str) -> Option<&'a mut Value> {
    let mut parts = path.split('.');
    let mut cur = root.get_mut(parts.next()?)?;
    for p in parts {
        cur = cur.as_table_mut()?.get_mut(p)?;
    }
    Some(cur)
}

/// The table at a dotted section path, created if absent.
fn table_at<'a>(root: &'a mut Table, path: &str, origin: &str) -> Result<&'a mut Table> {
    let mut cur = root;
    let mut so_far = String::new();
    for part in path.split('.') {
        if !so_far.is_empty() {
            so_far.push('.');
        }
        so_far.push_str(part);
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        cur = match entry {
            Value::Table(t) => t,
            other => {
                return Err(Error::Config(format!(
                    "{origin}: [{so_far}] must be a table, found {}",
                    other.type_str()
                )))
            }
        };
    }
    Ok(cur)
}

/// Moves old spellings to their current names (both given = error), before the check.
pub(crate) fn move_aliases(root: &mut Table, origin: &str) -> Result<()> {
    for s in schema::SECTIONS {
        for &(old, _, u) in schema::section_keys(s) {
            let Use::Alias(target) = u else { continue };
            let Some(Value::Table(tab)) = get_table_mut(root, s) else {
                continue;
            };
            let Some(v) = tab.remove(old) else { continue };
            let (ts, tk) = schema::split_path(target).expect("alias targets are section.key");
            let dest = table_at(root, ts, origin)?;
            if dest.contains_key(tk) {
                return Err(Error::Config(format!(
                    "{origin}: both [{s}] {old} and its current name [{ts}] {tk} are set; keep only {tk}"
                )));
            }
            dest.insert(tk.to_string(), v);
        }
    }
    Ok(())
}

/// Checks every section and key against the schema: unknown keys and wrong types are errors;
/// keys titan does not use are removed, and those set to a non-default value are returned by name.
pub(crate) fn check(root: &mut Table, origin: &str) -> Result<Vec<String>> {
    let mut ignored = Vec::new();
    let keys: Vec<String> = root.keys().cloned().collect();
    for name in keys {
        if !schema::is_section(&name) {
            return Err(Error::Config(format!(
                "{origin}: unknown section or top-level key '{name}' (torchtitan sections: {})",
                top_sections().join(", ")
            )));
        }
        check_section(root, &name, origin, &mut ignored)?;
    }
    Ok(ignored)
}

fn top_sections() -> Vec<&'static str> {
    schema::SECTIONS
        .iter()
        .copied()
        .filter(|s| !s.contains('.'))
        .collect()
}

fn check_section(
    root: &mut Table,
    path: &str,
    origin: &str,
    ignored: &mut Vec<String>,
) -> Result<()> {
    let table = match get_table_mut(root, path) {
        Some(Value::Table(t)) => t,
        Some(other) => {
            return Err(Error::Config(format!(
                "{origin}: [{path}] must be a table, found {}",
                other.type_str()
            )))
        }
        None => return Ok(()),
    };
    let keys: Vec<String> = table.keys().cloned().collect();
    let mut subsections = Vec::new();
    for key in keys {
        let sub = format!("{path}.{key}");
        if schema::is_section(&sub) {
            subsections.push(sub);
            continue;
        }
        let Some((kind, u)) = schema::lookup(path, &key) else {
            let hint = schema::suggest(path, &key)
                .map(|h| format!(" (did you mean '{h}'?)"))
                .unwrap_or_default();
            return Err(Error::Config(format!(
                "{origin}: unknown key '{key}' in [{path}]{hint}"
            )));
        };
        let v = table.get_mut(&key).expect("key listed above");
        check_kind(v, kind).map_err(|got| {
            Error::Config(format!(
                "{origin}: [{path}] {key} must be {}, got {got}",
                kind.describe()
            ))
        })?;
        match u {
            Use::Yes => {}
            Use::Moot => {
                table.remove(&key);
            }
            Use::No(default) => {
                let v = table.remove(&key).expect("key listed above");
                if !equals_default(&v, default) {
                    ignored.push(sub);
                }
            }
            Use::Alias(_) => unreachable!("aliases are moved before the check"),
        }
    }
    for sub in subsections {
        check_section(root, &sub, origin, ignored)?;
    }
    Ok(())
}

/// Checks (and normalises in place) a value against its kind; `Err` describes what was found.
fn check_kind(v: &mut Value, kind: Kind) -> std::result::Result<(), String> {
    let found = |v: &Value| match v {
        Value::String(s) => format!("the string \"{s}\""),
        other => format!("{} {other}", other.type_str()),
    };
    match (kind, &*v) {
        (Kind::Bool, Value::Boolean(_)) => Ok(()),
        (Kind::Int | Kind::OptInt, Value::Integer(_)) => Ok(()),
        (Kind::Float | Kind::OptFloat, Value::Float(_)) => Ok(()),
        (Kind::Float | Kind::OptFloat, Value::Integer(i)) => {
            *v = Value::Float(*i as f64);
            Ok(())
        }
        (Kind::Str | Kind::OptStr | Kind::StrOrInt, Value::String(_)) => Ok(()),
        (Kind::StrOrInt, Value::Integer(i)) => {
            *v = Value::String(i.to_string());
            Ok(())
        }
        (Kind::StrList, Value::Array(a)) if a.iter().all(Value::is_str) => Ok(()),
        (Kind::StrList, Value::String(s)) => {
            let list = s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect();
            *v = Value::Array(list);
            Ok(())
        }
        (Kind::Any, _) => Ok(()),
        _ => Err(found(v)),
    }
}

fn equals_default(v: &Value, default: &str) -> bool {
    if default.is_empty() {
        return false; // the default is "absent"; any value given is a change
    }
    let Some(d) = parse_literal(default) else {
        return false;
    };
    match (v, &d) {
        (Value::Float(a), Value::Integer(b)) | (Value::Integer(b), Value::Float(a)) => {
            *a == *b as f64
        }
        _ => *v == d,
    }
}

/// Removes tables left empty by the check (e.g. [quantize.linear.float8]) so that only titan's
/// sections reach serde.
pub(crate) fn prune_unused_sections(root: &mut Table) {
    root.retain(|k, _| super::TITAN_SECTIONS.contains(&k));
    for (name, v) in root.iter_mut() {
        if let Value::Table(t) = v {
            t.retain(|k, _| !schema::is_section(&format!("{name}.{k}")));
        }
    }
}
