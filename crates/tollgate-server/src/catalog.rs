//! The plans file and the catalog in memory. The file (TOML) is validated whole, then
//! applied to the database (`tollgate plans apply`, and at start when it changed);
//! the admin API changes single plans in the database. Every node keeps the stored
//! catalog in memory for the hot path and reloads it when it changes.

use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use sha2::{Digest, Sha256};
use tollgate_core::Store;
use tollgate_core::plans::{Catalog, PlanFile};
use tollgate_core::store::CatalogChanges;

/// Reads and validates a plans file; every problem is listed in the error.
pub fn load_file(path: &Path) -> anyhow::Result<Catalog> {
    Ok(read_file(path)?.0)
}

/// The file's catalog and the digest of its text.
fn read_file(path: &Path) -> anyhow::Result<(Catalog, String)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading plans file {}", path.display()))?;
    let catalog = parse(&text).with_context(|| format!("plans file {}", path.display()))?;
    Ok((catalog, hex::encode(Sha256::digest(text.as_bytes()))))
}

pub fn parse(text: &str) -> anyhow::Result<Catalog> {
    let file: PlanFile = toml::from_str(text).context("not a valid plans file")?;
    Catalog::from_file(file).map_err(|errors| {
        let list: Vec<String> = errors.iter().map(|e| format!("  - {e}")).collect();
        anyhow::anyhow!("invalid plans:\n{}", list.join("\n"))
    })
}

/// Where the digest of the plans file last applied is kept.
const APPLIED_DIGEST: &str = "plans_file_digest";

/// Applies a plans file whole (`tollgate plans apply`, or a changed file at start)
/// and remembers which file it was.
pub async fn apply_file(store: &Arc<dyn Store>, path: &Path) -> anyhow::Result<(Catalog, CatalogChanges)> {
    let (catalog, digest) = read_file(path)?;
    let changes = apply(store, &catalog, &digest).await?;
    Ok((catalog, changes))
}

async fn apply(store: &Arc<dyn Store>, catalog: &Catalog, digest: &str) -> anyhow::Result<CatalogChanges> {
    let now = time::OffsetDateTime::now_utc();
    let changes = store.apply_catalog(catalog, now).await?;
    store.put_setting(APPLIED_DIGEST, digest, now).await?;
    Ok(changes)
}

/// The catalog to serve at start. The plans file, when it exists, is applied if it
/// changed since it was last applied; an unchanged file leaves the stored plans as
/// they are, with the changes made through the admin API (which a changed file
/// replaces: the file is the source whenever it is edited). Without a file: the
/// stored plans, else the built-in free plan (so a running deployment's plans are
/// never replaced by the built-in one because a file went missing). Archived plans
/// are served too: their subscribers keep them.
pub async fn at_start(store: &Arc<dyn Store>, path: &Path) -> anyhow::Result<Catalog> {
    let mut credit_packages = Default::default();
    if path.exists() {
        let (file, digest) = read_file(path)?;
        if store.setting(APPLIED_DIGEST).await?.as_deref() == Some(digest.as_str()) {
            tracing::info!(path = %path.display(), "plans file unchanged since last applied: serving the stored plans");
        } else {
            log_changes(&apply(store, &file, &digest).await?);
        }
        credit_packages = file.credit_packages;
    }
    let catalog = match store.stored_catalog().await? {
        Some(stored) => stored,
        None => {
            let builtin = Catalog::builtin();
            store.apply_catalog(&builtin, time::OffsetDateTime::now_utc()).await?;
            tracing::info!(path = %path.display(), "no plans file: using the built-in free plan");
            builtin
        }
    };
    Ok(Catalog { credit_packages, ..catalog })
}

fn log_changes(changes: &CatalogChanges) {
    if !(changes.created.is_empty()
        && changes.updated.is_empty()
        && changes.archived.is_empty()
        && changes.deleted.is_empty())
    {
        tracing::info!(
            created = ?changes.created,
            updated = ?changes.updated,
            archived = ?changes.archived,
            deleted = ?changes.deleted,
            "plans applied"
        );
    }
}

/// Human-readable summary for `tollgate plans apply`.
pub fn describe(changes: &CatalogChanges) -> String {
    let mut out = String::new();
    for (label, items) in [
        ("created", &changes.created),
        ("updated", &changes.updated),
        ("archived (still in use)", &changes.archived),
        ("deleted", &changes.deleted),
        ("unchanged", &changes.unchanged),
    ] {
        if !items.is_empty() {
            out.push_str(&format!("{label}: {}\n", items.join(", ")));
        }
    }
    out
}

/// The catalog shared by handlers; swapped whole when plans change.
#[derive(Clone)]
pub struct SharedCatalog(Arc<RwLock<Arc<Catalog>>>);

impl SharedCatalog {
    pub fn new(catalog: Catalog) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(catalog))))
    }

    pub fn get(&self) -> Arc<Catalog> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, catalog: Catalog) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(catalog);
    }

    /// Serves the stored plans (changed through the admin API here or on another
    /// node, or by `tollgate plans apply`) if they differ from the ones served; the
    /// credit packages stay the file's. True when something changed.
    pub async fn reload(&self, store: &Arc<dyn Store>) -> anyhow::Result<bool> {
        let Some(stored) = store.stored_catalog().await? else { return Ok(false) };
        let current = self.get();
        let next = Catalog { credit_packages: current.credit_packages.clone(), ..stored };
        if next == *current {
            return Ok(false);
        }
        self.replace(next);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_plans_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/plans");
        let mut loaded = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let catalog = load_file(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            assert!(catalog.plans.len() >= 2, "{}", path.display());
            loaded += 1;
        }
        assert_eq!(loaded, 5);
        // Seed 001's packs: $15 = 100 credits, and calls past the plan paid in credits.
        let credits = load_file(&dir.join("credits-api.toml")).unwrap();
        let starter = &credits.credit_packages["starter"];
        assert_eq!((starter.credits, starter.amount, starter.currency.as_str()), (100, 1500, "USD"));
        assert_eq!(credits.credit_packages.len(), 3);
        assert_eq!(credits.meters["api_calls"].credits_per_unit, Some(1));
        assert_eq!(credits.plans["pro"].credits_overdraft, 50);
    }

    #[test]
    fn credit_settings_are_validated() {
        let err = parse(
            r#"
            [meters.storage]
            kind = "gauge"
            credits_per_unit = 2
            [meters.calls]
            kind = "counter"
            credits_per_unit = 0
            [plans.free]
            default = true
            credits_overdraft = -5
            [credit_packages.bad]
            credits = 0
            amount = 0
            currency = "usd"
            "#,
        )
        .unwrap_err();
        let text = format!("{err:#}");
        for expected in [
            "credits_per_unit is only for counter meters",
            "credits_per_unit must be positive",
            "credits_overdraft cannot be negative",
            "credits must be positive",
            "amount must be positive",
            "ISO 4217",
        ] {
            assert!(text.contains(expected), "{expected} missing in {text}");
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_place() {
        let err = parse(
            r#"
            [meters.messages]
            kind = "counter"
            [plans.free]
            prices = [{ amount = -1, currency = "usd", period = "month" }]
            [plans.free.limits]
            messages = 5
            nope = 1
            "#,
        )
        .unwrap_err();
        let text = format!("{err:#}");
        for expected in
            ["plans.free.limits.messages", "plans.free.limits.nope", "negative", "ISO 4217", "default = true"]
        {
            assert!(text.contains(expected), "{expected} missing in {text}");
        }
        assert!(parse("[plans.free]\ndefault = true\nmystery = 1").is_err(), "unknown keys are errors");
    }
}
