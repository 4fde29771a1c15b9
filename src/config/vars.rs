//! `${VAR}` expansion in pipeline strings.
//!
//! `${NAME}` takes the environment variable `NAME` if set, else `NAME` from the file's
//! `[vars]` table; `${NAME:-fallback}` uses `fallback` when neither has it. The environment
//! wins so a user can point a bundled pipeline at another dataset without editing it
//! (`data=/my/dataset voxflow run ...`). A `$` not followed by `{` is kept as it is.

use std::collections::BTreeMap;

/// Expands every `${...}` in `text`.
///
/// # Errors
/// An unterminated `${`, an empty name, or a variable defined nowhere without a fallback.
pub fn expand(text: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("unterminated `${{` in {text:?}"));
        };
        let body = &after[..end];
        let (name, fallback) = match body.split_once(":-") {
            Some((n, f)) => (n, Some(f)),
            None => (body, None),
        };
        if name.is_empty() {
            return Err(format!("empty variable name in {text:?}"));
        }
        let value = std::env::var(name).ok().or_else(|| vars.get(name).cloned());
        match value.or_else(|| fallback.map(str::to_string)) {
            Some(v) => out.push_str(&v),
            None => {
                return Err(format!(
                    "variable `{name}` is neither in the environment nor in [vars]"
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Expands variables in every string inside `value`.
///
/// # Errors
/// As [`expand`], for the first string that fails.
pub fn expand_value(
    value: &toml::Value,
    vars: &BTreeMap<String, String>,
) -> Result<toml::Value, String> {
    Ok(match value {
        toml::Value::String(s) => toml::Value::String(expand(s, vars)?),
        toml::Value::Array(items) => toml::Value::Array(
            items
                .iter()
                .map(|v| expand_value(v, vars))
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(t) => {
            let mut out = toml::Table::new();
            for (k, v) in t {
                out.insert(k.clone(), expand_value(v, vars)?);
            }
            toml::Value::Table(out)
        }
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> BTreeMap<String, String> {
        BTreeMap::from([("data".to_string(), "/d".to_string())])
    }

    #[test]
    fn expands_vars_and_fallbacks() {
        assert_eq!(expand("${data}/a/${data}", &vars()).unwrap(), "/d/a//d");
        assert_eq!(
            expand("${VOXFLOW_TEST_UNSET_9:-x}/y", &vars()).unwrap(),
            "x/y"
        );
        assert_eq!(expand("cost $5", &vars()).unwrap(), "cost $5");
    }

    #[test]
    fn rejects_broken_references() {
        assert!(
            expand("${data", &vars())
                .unwrap_err()
                .contains("unterminated")
        );
        assert!(expand("${}", &vars()).unwrap_err().contains("empty"));
        assert!(
            expand("${VOXFLOW_TEST_UNSET_9}", &vars())
                .unwrap_err()
                .contains("VOXFLOW_TEST_UNSET_9")
        );
    }
}
