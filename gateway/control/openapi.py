"""The control API's OpenAPI 3.1 document, served at /v1/openapi.json and used by the tests."""

from __future__ import annotations

from typing import Any

from gateway.kinds import Protocol, Reason

_PROTOCOL_PARAM: dict[str, Any] = {"type": "string", "enum": [p.value for p in Protocol]}
_TIME: dict[str, Any] = {"type": "string", "format": "date-time", "pattern": "Z$"}

_SESSION: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": [
        "id", "user", "source_ip", "source_port", "vm", "target_address", "target_port", "protocol",
        "login", "started_at", "duration_s", "bytes_up", "bytes_down", "node", "state", "ends_at", "connection_id",
        "client_name",
    ],
    "properties": {
        "id": {"type": "string"},
        "user": {"type": "string"},
        "source_ip": {"type": "string"},
        "source_port": {"type": "integer", "minimum": 0, "maximum": 65535},
        "vm": {"type": "string"},
        "target_address": {"type": "string"},
        "target_port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "protocol": {"type": "string", "enum": [p.value for p in Protocol]},
        "login": {"type": ["string", "null"]},
        "started_at": {"type": "string", "format": "date-time", "pattern": "Z$"},
        "duration_s": {"type": "number", "minimum": 0},
        "bytes_up": {"type": "integer", "minimum": 0},
        "bytes_down": {"type": "integer", "minimum": 0},
        "node": {"type": "string"},
        "state": {"type": "string", "enum": ["active", "terminating", "closed"]},
        "ends_at": {"oneOf": [_TIME, {"type": "null"}], "description": "while terminating: when the session will be ended"},
        "connection_id": {"type": ["string", "null"], "description": "the authenticated connection carrying it"},
        "client_name": {"type": ["string", "null"], "description": "the machine name an RD Gateway client gave"},
    },
}  # fmt: skip

_WHOAMI: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "role", "node"],
    "properties": {"name": {"type": "string"}, "role": {"type": "string", "enum": ["viewer", "operator"]}, "node": {"type": "string"}},
}

_NODE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["node", "self", "sessions", "last_heartbeat", "age_s"],
    "properties": {
        "node": {"type": "string"},
        "self": {"type": "boolean", "description": "the node that answered"},
        "sessions": {"type": "integer", "minimum": 0},
        "last_heartbeat": {"oneOf": [_TIME, {"type": "null"}]},
        "age_s": {"type": ["number", "null"], "minimum": 0},
    },
}

_LOST: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["node", "detected_at", "last_heartbeat", "sessions"],
    "properties": {
        "node": {"type": "string"},
        "detected_at": _TIME,
        "last_heartbeat": {"type": "string"},
        "sessions": {"type": "integer", "minimum": 0, "description": "its sessions, reported closed as node_lost"},
    },
}

_CLUSTER: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["node", "clustered", "degraded", "nodes", "sessions", "lost"],
    "properties": {
        "node": {"type": "string"},
        "clustered": {"type": "boolean", "description": "false: one node without [cluster]"},
        "degraded": {"type": "boolean", "description": "Redis unreachable: only this node is shown"},
        "heartbeat_s": {"type": "number"},
        "node_ttl_s": {"type": "number"},
        "nodes": {"type": "array", "items": _NODE},
        "sessions": {"type": "integer", "minimum": 0},
        "lost": {"type": "array", "items": _LOST, "description": "nodes whose heartbeat expired without a clean stop, newest last"},
    },
}

_CONNECTION: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "user", "source_ip", "source_port", "door", "auth_method", "since", "channels", "idle_s", "node"],
    "properties": {
        "id": {"type": "string"},
        "user": {"type": "string"},
        "source_ip": {"type": "string"},
        "source_port": {"type": "integer", "minimum": 0, "maximum": 65535},
        "door": {"type": "string", "enum": ["ssh", "websocket", "rdg", "web"]},
        "auth_method": {"type": "string"},
        "since": _TIME,
        "channels": {"type": "integer", "minimum": 0, "description": "sessions, shells and forwards open on it now"},
        "idle_s": {"type": "number", "minimum": 0, "description": "seconds without any channel"},
        "node": {"type": "string"},
    },
}

_LOCK: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "kind", "target", "reason", "created_at", "expires_at", "created_by"],
    "properties": {
        "id": {"type": "string"},
        "kind": {"type": "string", "enum": ["user", "vm", "source"]},
        "target": {"type": "string", "description": "a user name, a VM name, or a CIDR network"},
        "reason": {"type": "string"},
        "created_at": _TIME,
        "expires_at": {"oneOf": [_TIME, {"type": "null"}]},
        "created_by": {"type": "string"},
    },
}

_LOCK_BODY: dict[str, Any] = {
    "type": "object",
    "description": "exactly one of user, vm, source",
    "properties": {
        "user": {"type": "string"},
        "vm": {"type": "string"},
        "source": {"type": "string", "description": "an IP address or a CIDR network"},
        "reason": {"type": "string", "maxLength": 300},
        "expires": {"type": "string", "description": "a duration ('30m', '2h') or an ISO 8601 time; absent: until lifted"},
    },
}

_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
}

_DISCONNECT_BODY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reason": {"type": "string", "maxLength": 400},
        "grace_s": {"type": "number", "minimum": 0, "maximum": 3600},
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


_ERRORS = {
    "400": _json(_ref("Error"), "Bad request: the message names what is wrong"),
    "401": _json(_ref("Error"), "Missing or wrong bearer token"),
    "403": _json(_ref("Error"), "The operator's role may not do this"),
    "413": _json(_ref("Error"), "Body too large"),
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Bastion gateway control API", "version": "1"},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Session": _SESSION,
            "Connection": _CONNECTION,
            "Lock": _LOCK,
            "Error": _ERROR,
            "SessionList": {
                "type": "object",
                "required": ["sessions", "node"],
                "properties": {
                    "sessions": {"type": "array", "items": _ref("Session")},
                    "node": {"type": "string"},
                    "degraded": {"type": "boolean", "description": "with [cluster]: Redis unreachable, only this node's sessions"},
                    "nodes": {"type": "object", "additionalProperties": _TIME, "description": "with [cluster]: node -> last heartbeat"},
                },
            },
            "DisconnectResult": {
                "type": "object",
                "required": ["id", "result"],
                "properties": {
                    "id": {"type": "string"},
                    "result": {"type": "string", "enum": ["disconnected", "pending", "failed", "node_unreachable"]},
                    "ends_at": _TIME,
                },
            },
            "BulkDisconnect": {
                "type": "object",
                "required": ["ids"],
                "properties": {
                    "ids": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1000},
                    **_DISCONNECT_BODY["properties"],
                },
            },
            "BulkResults": {
                "type": "object",
                "required": ["results"],
                "properties": {
                    "results": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "string",
                            "enum": ["disconnected", "pending", "not_found", "failed", "node_unreachable"],
                        },
                    },
                    "ends_at": {"type": "object", "additionalProperties": _TIME, "description": "for each pending id"},
                },
            },
            "Reason": {"type": "string", "enum": [r.value for r in Reason], "description": "why a session ended (closed events)"},
            "Notice": {
                "type": "object",
                "required": ["message"],
                "properties": {
                    "message": {"type": "string", "minLength": 1, "maxLength": 400},
                    "ids": {"type": "array", "items": {"type": "string"}},
                },
            },
            "NoticeResults": {
                "type": "object",
                "required": ["results"],
                "properties": {
                    "results": {
                        "type": "object",
                        "additionalProperties": {"type": "string", "enum": ["delivered", "not_found", "unsupported", "node_unreachable"]},
                    }
                },
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}, **_ERRORS}}},
        "/v1/whoami": {
            "get": {
                "summary": "The operator this token belongs to",
                "responses": {"200": _json(_WHOAMI, "Name, role and the node answering"), **_ERRORS},
            }
        },
        "/v1/cluster": {
            "get": {
                "summary": "Nodes, sessions per node, last heartbeats, recently lost nodes (one node alone: a cluster of one)",
                "responses": {"200": _json(_CLUSTER, "The cluster as this node sees it"), **_ERRORS},
            }
        },
        "/ui": {
            "get": {
                "security": [],
                "summary": "The sessions page (no data; it asks for a token)",
                "responses": {"200": {"description": "HTML"}},
            }
        },
        "/ui/app.js": {
            "get": {"security": [], "summary": "The sessions page's script", "responses": {"200": {"description": "JavaScript"}}}
        },
        "/healthz": {"get": {"security": [], "responses": {"200": {"description": "Alive"}}}},
        "/readyz": {"get": {"security": [], "responses": {"200": {"description": "Serving"}, "503": {"description": "Starting"}}}},
        "/metrics": {"get": {"responses": {"200": {"description": "Prometheus text exposition"}}}},
        "/v1/sessions": {
            "get": {
                "summary": "Every live session (fresh on every call)",
                "parameters": [
                    *({"name": n, "in": "query", "required": False, "schema": {"type": "string"}} for n in ("user", "vm")),
                    {"name": "protocol", "in": "query", "required": False, "schema": _PROTOCOL_PARAM},
                ],
                "responses": {"200": _json(_ref("SessionList"), "Live sessions"), **_ERRORS},
            }
        },
        "/v1/sessions/{id}": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "get": {"responses": {"200": _json(_ref("Session"), "The session"), "404": _json(_ref("Error"), "No such session"), **_ERRORS}},
            "delete": {
                "summary": "Force a disconnect (operator)",
                "requestBody": {"required": False, "content": {"application/json": {"schema": _DISCONNECT_BODY}}},
                "responses": {
                    "200": _json(_ref("DisconnectResult"), "Accepted"),
                    "404": _json(_ref("Error"), "No such session"),
                    **_ERRORS,
                },
            },
        },
        "/v1/sessions/disconnect": {
            "post": {
                "summary": "Force several disconnects (operator)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("BulkDisconnect")}}},
                "responses": {"200": _json(_ref("BulkResults"), "Result per id"), **_ERRORS},
            }
        },
        "/v1/notices": {
            "post": {
                "summary": "Write a message into live SSH terminals (operator)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("Notice")}}},
                "responses": {"200": _json(_ref("NoticeResults"), "Result per id"), **_ERRORS},
            }
        },
        "/v1/connections": {
            "get": {
                "summary": "Every authenticated connection: SSH connections and WebSocket clients",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["connections", "node"],
                            "properties": {"connections": {"type": "array", "items": _ref("Connection")}, "node": {"type": "string"}},
                        },
                        "Live connections",
                    ),
                    **_ERRORS,
                },
            }
        },
        "/v1/connections/{id}": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "delete": {
                "summary": "End a connection and every session on it, showing the reason (operator)",
                "requestBody": {"required": False, "content": {"application/json": {"schema": _DISCONNECT_BODY}}},
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["id", "result", "sessions_ended"],
                            "properties": {
                                "id": {"type": "string"},
                                "result": {"type": "string", "enum": ["ending", "already_ending"]},
                                "sessions_ended": {"type": "integer", "minimum": 0},
                            },
                        },
                        "Ending",
                    ),
                    "404": _json(_ref("Error"), "No such connection"),
                    **_ERRORS,
                },
            },
        },
        "/v1/locks": {
            "get": {
                "summary": "Locks in force",
                "responses": {
                    "200": _json(
                        {"type": "object", "required": ["locks"], "properties": {"locks": {"type": "array", "items": _ref("Lock")}}},
                        "Locks",
                    ),
                    **_ERRORS,
                },
            },
            "post": {
                "summary": "Lock a user, a VM or a source network (operator): live access ends, new access is refused",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _LOCK_BODY}}},
                "responses": {
                    "201": _json(
                        {
                            "type": "object",
                            "required": ["lock", "sessions_ended", "connections_ended"],
                            "properties": {
                                "lock": _ref("Lock"),
                                "sessions_ended": {"type": "integer", "minimum": 0},
                                "connections_ended": {"type": "integer", "minimum": 0},
                            },
                        },
                        "Locked",
                    ),
                    **_ERRORS,
                },
            },
        },
        "/v1/locks/{id}": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "delete": {
                "summary": "Lift a lock (operator)",
                "responses": {
                    "200": _json({"type": "object", "required": ["lock"], "properties": {"lock": _ref("Lock")}}, "Lifted"),
                    "404": _json(_ref("Error"), "No such lock"),
                    **_ERRORS,
                },
            },
        },
        "/v1/events": {
            "get": {
                "summary": "Server-Sent Events: snapshot, opened, updated, closed, progress",
                "description": (
                    "`snapshot` {sessions, resync} first and again whenever this stream fell behind (never a silent gap); "
                    "`opened`/`updated`/`closed` {session, reason?}; `progress` {sessions: [{id, bytes_up, bytes_down}]} "
                    "once a tick for every session whose bytes moved. With a cluster, every node's sessions (each with its "
                    "`node`), the snapshot also carries `nodes` and `degraded`, and the sessions of a node that died are "
                    "`closed` with reason `node_lost`."
                ),
                "responses": {
                    "200": {"description": "text/event-stream"},
                    "503": _json(_ref("Error"), "Too many event streams are open"),
                    **_ERRORS,
                },
            }
        },
    },
}
