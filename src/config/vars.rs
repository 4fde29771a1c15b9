//! `${VAR}` expansion in pipeline strings.
//!
//! `${NAME}` takes the environment variable `NAME` if set, else `NAME` from the file's
//! `[vars]` table; `${NAME:-fallback}` uses `fallback` when neither has it. The environment
//! wins so a user can point a bundled pipeline at another dataset without editing it
//! (`data=/my/dataset voxflow run ...`). A `$` not followed by `{` is kept as it is.
//!
//! `[vars]` values are expanded first ([`resolve`]), so one may build on another
//! (`data = "${base}/data"`); a fallback may itself hold `${...}`, expanded only when taken.
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
    expand_with(text, vars, &|name| std::env::var(name).ok())
}

/// [`expand`] with `env` in place of the process environment (for tests).
fn expand_with(
    text: &str,
    vars: &BTreeMap<String, String>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = closing_brace(after) else {
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
        let value = match (value, fallback) {
            (Some(v), _) => Some(v),
            // A fallback may itself use variables (`${A:-${data}/x}`), expanded only when taken.
            (None, Some(f)) => Some(expand_with(f, vars, env)?),
            (None, None) => None,
        };
        match value {
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

/// Where the `}` closing a `${` sits in `after` (the text after the `${`), counting the
/// `${ ... }` nested in a fallback.
fn closing_brace(after: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = after.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'{' if i > 0 && bytes[i - 1] == b'$' => depth += 1,
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// The `[vars]` table with each value's own `${...}` expanded: a value may use the
/// environment and the other variables (`data = "${base}/data"`). A variable the
/// environment sets is taken from there as it is.
///
/// # Errors
/// The first variable whose value cannot be expanded, with the reason; variables that refer
/// to each other in a cycle.
pub fn resolve(
    vars: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, (String, String)> {
    resolve_with(vars, |name| std::env::var(name).ok())
}

/// [`resolve`] with `env` in place of the process environment (for tests).
fn resolve_with(
    vars: &BTreeMap<String, String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, String>, (String, String)> {
    let mut current = vars.clone();
    // Each pass replaces one level of references; a chain can be at most as long as the
    // table, so more passes than variables means a cycle.
    for _ in 0..=vars.len() {
        let mut next = BTreeMap::new();
        for (name, value) in &current {
            let expanded = expand_with(value, &current, &env).map_err(|e| (name.clone(), e))?;
            next.insert(name.clone(), expanded);
        }
        if next == current {
            break;
        }
        current = next;
    }
    let looping: Vec<&str> = current
        .iter()
        .filter(|(_, v)| v.contains("${"))
        .map(|(n, _)| n.as_str())
        .collect();
    let Some(first) = looping.first().map(|n| n.to_string()) else {
        return Ok(current);
    };
    Err((
        first,
        format!(
            "[vars] refer to each other in a cycle: {}",
            looping.join(", ")
        ),
    ))
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
        let expand = |text: &str| expand_with(text, &vars, &env);
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
    fn vars_use_each_other_and_fallbacks_nest() {
        let table = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let env = |name: &str| (name == "SCRATCH").then(|| "/scratch".to_string());
        let vars = table(&[
            ("base", "/lab"),
            ("data", "${base}/data"),
            ("subjects", "${data}/oasis"),
            ("cache", "${SCRATCH:-${base}/cache}"),
            ("out", "${OUT:-${base}/out}"),
        ]);
        let done = resolve_with(&vars, env).unwrap();
        assert_eq!(done["subjects"], "/lab/data/oasis");
        assert_eq!(done["cache"], "/scratch");
        assert_eq!(done["out"], "/lab/out");
        assert_eq!(
            expand_with("${ROOT:-${subjects}}/x", &done, &env).unwrap(),
            "/lab/data/oasis/x"
        );
        // A fallback that is not taken is not expanded.
        assert_eq!(
            expand_with("${SCRATCH:-${nowhere}}", &done, &env).unwrap(),
            "/scratch"
        );
        let looping = table(&[("a", "${b}/x"), ("b", "${a}/y"), ("c", "fine")]);
        let (name, why) = resolve_with(&looping, env).unwrap_err();
        assert_eq!(name, "a");
        assert!(why.contains("cycle") && why.contains("a, b"), "{why}");
        let (name, why) = resolve_with(&table(&[("a", "${nowhere}")]), env).unwrap_err();
        assert!(name == "a" && why.contains("nowhere"), "{why}");
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
