//! Both backends must share migration versions and names, so that "migration 3" means
//! the same change everywhere.

#[test]
fn sqlite_and_postgres_migrations_match() {
    let names = |list: &[(i64, &str, &str)]| list.iter().map(|(v, n, _)| (*v, n.to_string())).collect::<Vec<_>>();
    assert_eq!(names(tollgate_store_sqlite::MIGRATIONS), names(tollgate_store_postgres::MIGRATIONS));
    let versions: Vec<i64> = tollgate_store_sqlite::MIGRATIONS.iter().map(|m| m.0).collect();
    let expected: Vec<i64> = (1..=versions.len() as i64).collect();
    assert_eq!(versions, expected, "versions are consecutive from 1");
}
