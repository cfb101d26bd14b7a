"""Registered versions as the registry's readers see them: the aliases, the listing, the logged model
behind a version. The base of the registry package (registry.py and card.py both read it)."""

from __future__ import annotations

from mlflow import MlflowClient

CHALLENGER, CHAMPION = "challenger", "champion"


def list_versions(*, tracking_uri: str, name: str | None = None) -> list[dict]:
    """Every version (of `name`, or of every genpipe model) with its aliases and tags."""
    client = MlflowClient(tracking_uri=tracking_uri)
    query = f"name='{name}'" if name else "name LIKE 'genpipe-%'"
    rows, aliases = [], {}
    for mv in client.search_model_versions(query):
        if mv.name not in aliases:  # search results carry no aliases; the registered model does
            held = client.get_registered_model(mv.name).aliases or {}
            aliases[mv.name] = {
                str(v): sorted(a for a, w in held.items() if str(w) == str(v)) for v in held.values()
            }
        rows.append(
            {
                "name": mv.name,
                "version": str(mv.version),
                "aliases": aliases[mv.name].get(str(mv.version), []),
                "run_id": mv.run_id,
                "tags": dict(mv.tags),
            }
        )
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


def logged_model_id(mv) -> str | None:
    """The logged model a version was registered from (the sqlite registry keeps it only in the source)."""
    source = str(mv.source or "")
    return getattr(mv, "model_id", None) or (
        source.removeprefix("models:/") if source.startswith("models:/m-") else None
    )


def version_by_tag(*, tracking_uri: str, name: str, key: str, value: str) -> dict | None:
    """The newest version of `name` whose tag `key` equals `value` (e.g. its model_sha256), or None."""
    matches = [r for r in list_versions(tracking_uri=tracking_uri, name=name) if r["tags"].get(key) == value]
    return matches[-1] if matches else None
