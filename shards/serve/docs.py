"""The router's /docs page: its OpenAPI schema as one plain HTML page, readable offline.

FastAPI's own /docs and /redoc load their scripts from a CDN, so they are blank on a machine
without internet, and no installed package ships swagger-ui's assets. This page has no script
and links only to the app's own /openapi.json: each route with its method, its description,
whether it needs the token, its parameters, its request body and its responses, then the
body models field by field.
"""
from __future__ import annotations

import json
from html import escape

CSS = ("body{font:15px/1.45 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
       "code,pre{font:13px ui-monospace,monospace}pre{background:#f4f4f4;padding:.6em;overflow:auto}"
       "table{border-collapse:collapse;margin:.4em 0 1em}td,th{border:1px solid #ccc;padding:.25em .5em;"
       "text-align:left;vertical-align:top}.m{font-weight:bold;text-transform:uppercase}"
       "section{border-top:1px solid #ddd;margin-top:1.2em}")


class Html(str):
    """Text that is already HTML (a type, with its links): written into a cell as it is."""


def page(spec: dict) -> str:
    """The whole page of an OpenAPI spec (FastAPI's app.openapi())."""
    info = spec.get("info", {})
    title = escape(f"{info.get('title', 'API')} {info.get('version', '')}".strip())
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
             f"<style>{CSS}</style></head><body><h1>{title}</h1>",
             f"<p>{escape(info.get('description', ''))}</p>",
             "<p>The schema itself: <a href='openapi.json'>openapi.json</a>. Endpoints marked <b>token</b> need "
             "<code>Authorization: Bearer &lt;token&gt;</code> when the server was started with a token.</p>"]
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            parts.append(_operation(path, method, op))
    schemas = spec.get("components", {}).get("schemas", {})
    if schemas:
        parts.append("<section><h2>Models</h2>")
        parts += [_model(name, s) for name, s in schemas.items()]
        parts.append("</section>")
    return "\n".join(parts + ["</body></html>"])


def _operation(path: str, method: str, op: dict) -> str:
    token = " &middot; <b>token</b>" if op.get("security") else ""
    out = [f"<section id='{escape(method)}-{escape(path)}'><h2><span class='m'>{escape(method)}</span> "
           f"<code>{escape(path)}</code>{token}</h2>"]
    text = op.get("description") or op.get("summary") or ""
    if text:
        out.append(f"<p>{escape(text)}</p>")
    params = op.get("parameters") or []
    if params:
        rows = [(p["name"], p.get("in", ""), _type(p.get("schema", {})), p.get("required", False),
                 p.get("description", "")) for p in params]
        out.append(_table(("parameter", "in", "type", "required", "description"), rows))
    body = op.get("requestBody", {}).get("content", {})
    for ctype, c in body.items():
        out.append(f"<p>Request body (<code>{escape(ctype)}</code>): {_type(c.get('schema', {}))}</p>")
    rows = [(code, r.get("description", ""), Html(" | ".join(_type(c.get("schema", {}))
                                                             for c in r.get("content", {}).values())))
            for code, r in op.get("responses", {}).items()]
    out.append(_table(("response", "description", "body"), rows))
    return "".join(out) + "</section>"


def _model(name: str, s: dict) -> str:
    out = [f"<h3 id='schema-{escape(name)}'>{escape(name)}</h3>"]
    if s.get("description"):
        out.append(f"<p>{escape(s['description'])}</p>")
    required = set(s.get("required", ()))
    rows = [(f, _type(p), f in required, p.get("default", ""), p.get("description", ""))
            for f, p in s.get("properties", {}).items()]
    if rows:
        out.append(_table(("field", "type", "required", "default", "description"), rows))
    for ex in s.get("examples", ()):
        out.append(f"<pre>{escape(json.dumps(ex))}</pre>")
    return "".join(out)


def _type(s: dict) -> Html:
    """A JSON schema in a few words of HTML: a model links to its table below."""
    if "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[-1]
        return Html(f"<a href='#schema-{escape(name)}'>{escape(name)}</a>")
    if "anyOf" in s:
        return Html(" | ".join(_type(x) for x in s["anyOf"]))
    t = s.get("type", "any")
    if t == "array":
        return Html(f"array of {_type(s.get('items', {}))}")
    if t == "object" and isinstance(s.get("additionalProperties"), dict):
        return Html(f"object of {_type(s['additionalProperties'])}")
    bounds = [f"{k} {s[k]}" for k in ("minimum", "maximum", "minItems", "maxItems", "maxLength") if k in s]
    return Html(escape(str(t) + (f" ({', '.join(bounds)})" if bounds else "")))


def _table(head: tuple, rows: list[tuple]) -> str:
    def cell(v) -> str:
        if isinstance(v, bool):
            return "yes" if v else ""
        if isinstance(v, Html):
            return v
        return escape(v if isinstance(v, str) else json.dumps(v))

    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"
