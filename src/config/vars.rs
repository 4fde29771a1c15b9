//! `${VAR}` expansion in pipeline strings.
//!
//! `${NAME}` takes the environment variable `NAME` if set, else `NAME` from the file's
//! `[vars]` table; `${NAME:-fallback}` uses `fallback` when neither has it. The environment
//! wins so a user can point a bundled pipeline at another dataset without editing it
//! (`data=/my/dataset voxflow run ...`). A `$` not followed by `{` is kept as it is.
//!
//! An environment variable that is set but empty (`data= voxflow run ...`, or
//! `data=$UNSET_VAR`) is an error where `${NAME}` uses it, rather than a silent switch to
//! `[vars]` (the run would then go over the file's default dataset) or an empty path (the
//! working directory). `${NAME:-fallback}` takes the fallback for an empty value, as the
//! shell does: `${NAME:-}` is how a file accepts an empty one.

use std::collections::BTreeMap;

/// Expands every `${...}` in `text`.
///
/// # Errors
/// An unterminated `${`, an empty name, a variable defined nowhere without a fallback, or
/// one the environment sets to an empty value without a fallback.
pub fn expand(text: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    expand_with(text, vars, |name| std::env::var(name).ok())
}

/// [`expand`] with `env` in place of the process environment (for tests).
fn expand_with(
    text: &str,
    vars: &BTreeMap<String, String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
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
        let value = match env(name) {
            Some(v) if !v.is_empty() => Some(v),
            Some(_) if fallback.is_none() => return Err(empty_in_environment(name, vars)),
            // Unset, or empty with a fallback: `[vars]`, then the fallback, which an empty
            // `[vars]` value also gives way to.
            _ => vars
                .get(name)
                .filter(|v| fallback.is_none() || !v.is_empty())
                .cloned(),
        };
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

/// Why `${name}` cannot take the environment's empty value.
fn empty_in_environment(name: &str, vars: &BTreeMap<String, String>) -> String {
    let instead = match vars.get(name) {
        Some(v) => format!(" (it replaces [vars] {name} = {v:?})"),
        None => String::new(),
    };
    format!(
        "the environment variable `{name}` is set but empty{instead}; unset it or give it a \
         value (`${{{name}:-}}` in the file accepts an empty one)"
    )
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

    /// `data= voxflow run` names the empty variable instead of giving an empty path; `:-`
    /// takes its fallback for an empty value, as the shell does.
    #[test]
    fn an_empty_environment_variable_is_named_unless_a_fallback_allows_it() {
        let vars = BTreeMap::from([
            ("data".to_string(), "/from/vars".to_string()),
            ("blank".to_string(), String::new()),
        ]);
        let env = |name: &str| ["data", "scratch"].contains(&name).then(String::new);
        let expand = |text: &str| expand_with(text, &vars, env);
        let err = expand("${data}/x").unwrap_err();
        assert!(
            err.contains("`data` is set but empty") && err.contains("/from/vars"),
            "{err}"
        );
        assert!(expand("${scratch}").unwrap_err().contains("`scratch`"));
        assert_eq!(expand("${data:-fb}").unwrap(), "/from/vars");
        assert_eq!(expand("${scratch:-fb}").unwrap(), "fb");
        assert_eq!(expand("${scratch:-}").unwrap(), "");
        assert_eq!(expand("${blank:-fb}").unwrap(), "fb");
        assert_eq!(expand("${blank}").unwrap(), "");
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
