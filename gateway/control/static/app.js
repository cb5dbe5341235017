"use strict";
// The sessions page. Every request carries the operator's token in a header (never a cookie), so other sites
// cannot act on the operator's behalf; the token lives in this tab's sessionStorage at most, and Sign out clears it.
// Everything that comes from sessions (user names, client names, reasons) is set as text, never as HTML.
// Rows are kept and updated in place (not rebuilt every second), so keyboard focus and hover titles survive.
(() => {
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "bastion-token";
  const sessions = new Map(); // id -> session as the API shows it
  const rows = new Map(); // id -> {tr, cells, box}
  const selected = new Set();
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let role = "";
  let stream = null;
  let retry = null;
  let skewMs = 0; // the gateway's clock minus ours, from the sessions' duration_s
  let sortKey = "started";
  let sortDir = -1; // newest first
  let terms = [];

  const canAct = () => role === "operator";
  const el = (tag, props = {}, ...children) => {
    const e = Object.assign(document.createElement(tag), props);
    e.append(...children);
    return e;
  };
  const shortId = (id) => id.slice(0, 8);
  const who = (s) => s.user + " on " + s.vm;
  const serverNow = () => Date.now() + skewMs;

  const setStatus = (text, error = false) => {
    $("status").textContent = text;
    $("status").className = error ? "error" : "";
  };

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(method, path, body) {
    let res;
    try {
      res = await fetch(path, {
        method,
        headers: Object.assign({ Authorization: "Bearer " + token }, body ? { "Content-Type": "application/json" } : {}),
        body: body ? JSON.stringify(body) : undefined,
        cache: "no-store",
        credentials: "omit",
      });
    } catch (e) {
      throw new ApiError(0, "the gateway's control port did not answer");
    }
    const data = await res.json().catch(() => ({}));
    if (!res.ok) throw new ApiError(res.status, data.message || res.statusText || "HTTP " + res.status);
    return data;
  }

  // -- formatting --
  const pad = (n) => String(n).padStart(2, "0");
  const fmtBytes = (n) => {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  };
  const fmtDuration = (s) => {
    s = Math.max(0, Math.floor(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return (h ? h + "h " : "") + (h || m ? m + "m " : "") + sec + "s";
  };
  const fmtCountdown = (s) => {
    s = Math.max(0, Math.ceil(s));
    return Math.floor(s / 60) + ":" + pad(s % 60);
  };
  const zoneParts = new Intl.DateTimeFormat("en-US", {
    year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit",
    hourCycle: "h23", timeZoneName: "short",
  });
  // "2025-06-01 14:03:05 UTC": the browser's time zone, always with its date and name.
  const fmtDateTime = (d) => {
    const p = Object.fromEntries(zoneParts.formatToParts(d).map((x) => [x.type, x.value]));
    return p.year + "-" + p.month + "-" + p.day + " " + p.hour + ":" + p.minute + ":" + p.second + " " + p.timeZoneName;
  };
  const relative = new Intl.RelativeTimeFormat("en", { numeric: "auto" });
  const fmtAgo = (ms) => {
    const s = Math.round(ms / 1000);
    if (Math.abs(s) < 60) return relative.format(-s, "second");
    if (Math.abs(s) < 3600) return relative.format(-Math.round(s / 60), "minute");
    if (Math.abs(s) < 86400) return relative.format(-Math.round(s / 3600), "hour");
    return relative.format(-Math.round(s / 86400), "day");
  };

  // -- filter and sort --
  const FIELDS = {
    id: (s) => s.id,
    user: (s) => s.user,
    source: (s) => s.source_ip + ":" + s.source_port + (s.client_name ? " " + s.client_name : ""),
    vm: (s) => s.vm,
    protocol: (s) => s.protocol,
    login: (s) => s.login || "",
    node: (s) => s.node || "",
    state: (s) => s.state,
  };
  const matches = (s) => terms.every((t) => {
    const cut = t.indexOf(":");
    const key = cut > 0 ? t.slice(0, cut) : "";
    if (key in FIELDS) return FIELDS[key](s).toLowerCase().includes(t.slice(cut + 1));
    return Object.values(FIELDS).some((f) => f(s).toLowerCase().includes(t));
  });
  const SORT = {
    started: (s) => Date.parse(s.started_at),
    duration: (s) => -Date.parse(s.started_at),
    bytes: (s) => s.bytes_up + s.bytes_down,
  };
  const collator = new Intl.Collator("en", { numeric: true, sensitivity: "base" });
  const compare = (a, b) => {
    const f = SORT[sortKey];
    const c = f ? f(a) - f(b) : collator.compare(FIELDS[sortKey](a), FIELDS[sortKey](b));
    return sortDir * (c || collator.compare(a.id, b.id));
  };

  // -- rows --
  function makeRow(s) {
    const tr = el("tr");
    tr.dataset.id = s.id;
    tr.setAttribute("role", "row");
    const cell = (name, cls = "") => {
      const td = el("td", { className: (name + " " + cls).trim() });
      td.setAttribute("role", "cell");
      const head = document.querySelector('th[data-key="' + name + '"]');
      if (head) td.dataset.label = head.textContent.trim(); // the card layout's field names
      return td;
    };
    const c = {
      select: cell("select"), id: cell("id"), user: cell("user"), source: cell("source"), vm: cell("vm"),
      protocol: cell("protocol"), login: cell("login"), started: cell("started"), duration: cell("duration", "num"),
      bytes: cell("bytes", "num"), node: cell("node"), state: cell("state"), actions: cell("actions"),
    };
    const row = { tr, cells: c, box: null };
    c.id.append(el("code", { title: s.id, textContent: shortId(s.id) }), " ",
      el("button", { type: "button", className: "small copy", textContent: "Copy", title: "Copy the whole session ID", onclick: () => copyId(s.id) }));
    c.id.querySelector("button").setAttribute("aria-label", "Copy session ID " + s.id);
    if (canAct()) {
      row.box = el("input", { type: "checkbox" });
      row.box.setAttribute("aria-label", "Select session " + shortId(s.id) + " of " + who(s));
      row.box.addEventListener("change", () => {
        if (row.box.checked) selected.add(s.id); else selected.delete(s.id);
        updateBulk();
      });
      c.select.append(row.box);
      const disc = el("button", { type: "button", className: "small danger disconnect", textContent: "Disconnect", onclick: () => askDisconnect([s.id]) });
      disc.setAttribute("aria-label", "Disconnect " + who(s) + " (session " + shortId(s.id) + ")");
      const note = el("button", { type: "button", className: "small notice", textContent: "Notice", onclick: () => askNotice([s.id]) });
      note.setAttribute("aria-label", "Send a notice to " + who(s) + " (session " + shortId(s.id) + ")");
      c.actions.append(disc, note);
    } else {
      c.select.hidden = true;
      c.actions.hidden = true;
    }
    tr.append(...Object.values(c));
    rows.set(s.id, row);
    return row;
  }

  function fillRow(row, s) {
    const c = row.cells;
    c.user.textContent = s.user;
    c.source.replaceChildren(s.source_ip + ":" + s.source_port);
    if (s.client_name) c.source.append(el("span", { className: "sub", textContent: s.client_name }));
    c.vm.textContent = s.vm;
    c.protocol.textContent = s.protocol;
    c.login.textContent = s.login || "-";
    const [day, time] = fmtDateTime(new Date(s.started_at)).split(/ (.*)/);
    c.started.replaceChildren(day + " ", el("span", { className: "sub", textContent: time }));
    c.bytes.replaceChildren(el("span", { textContent: "\u2191 " + fmtBytes(s.bytes_up) }),
      el("span", { className: "sub", textContent: "\u2193 " + fmtBytes(s.bytes_down) }));
    c.bytes.title = s.bytes_up + " bytes up (from the user), " + s.bytes_down + " bytes down";
    c.node.textContent = s.node || "-";
    if (row.box) row.box.checked = selected.has(s.id);
    tick(row, s);
  }

  // What changes with time alone: the duration, the relative start, a pending disconnect's countdown.
  function tick(row, s) {
    const c = row.cells;
    const now = serverNow();
    const started = Date.parse(s.started_at);
    c.duration.textContent = fmtDuration((now - started) / 1000);
    c.started.title = "started " + fmtAgo(now - started) + " (" + s.started_at + ")";
    let text = s.state, title = "";
    if (s.state === "terminating" && s.ends_at) {
      const left = (Date.parse(s.ends_at) - now) / 1000;
      text = left > 0 ? "ending in " + fmtCountdown(left) : "ending now";
      title = "disconnect pending: ends at " + fmtDateTime(new Date(Date.parse(s.ends_at) - skewMs));
    }
    let badge = c.state.firstChild;
    if (!badge) { badge = el("span"); c.state.append(badge); }
    badge.className = "badge " + s.state;
    badge.textContent = text;
    c.state.title = title;
  }

  function render() {
    const body = $("rows");
    const focused = document.activeElement;
    for (const [id, row] of rows) if (!sessions.has(id)) { row.tr.remove(); rows.delete(id); }
    for (const id of [...selected]) if (!sessions.has(id)) selected.delete(id);
    const list = [...sessions.values()].filter(matches).sort(compare);
    const shown = new Set(list.map((s) => s.id));
    for (const [id, row] of rows) if (!shown.has(id) && row.tr.isConnected) row.tr.remove();
    let at = body.firstElementChild;
    if (at && at.id === "empty-row") { at.remove(); at = body.firstElementChild; }
    for (const s of list) {
      const row = rows.get(s.id) || makeRow(s);
      fillRow(row, s);
      if (row.tr !== at) body.insertBefore(row.tr, at); // moves only rows out of place
      else at = at.nextElementSibling;
    }
    if (focused && focused !== document.activeElement) {
      if (focused.isConnected) focused.focus();
      else if (body.contains(focused) || !document.activeElement || document.activeElement === document.body) $("filter").focus();
    }
    if (!list.length) {
      const td = el("td", { className: "empty", textContent: sessions.size ? "No session matches the filter." : "No sessions." });
      td.colSpan = 13;
      td.setAttribute("role", "cell");
      const tr = el("tr", { id: "empty-row" }, td);
      tr.setAttribute("role", "row");
      body.append(tr);
    }
    const n = sessions.size;
    $("count").textContent = list.length === n ? n + " session" + (n === 1 ? "" : "s") : list.length + " of " + n + " sessions shown";
    updateBulk();
  }

  function updateBulk() {
    const shown = [...rows.values()].filter((r) => r.tr.isConnected).map((r) => r.tr.dataset.id);
    const picked = shown.filter((id) => selected.has(id)).length;
    $("all").checked = shown.length > 0 && picked === shown.length;
    $("all").indeterminate = picked > 0 && picked < shown.length;
    $("disconnect").disabled = selected.size === 0;
    $("notice-selected").disabled = selected.size === 0;
    $("disconnect").textContent = "Disconnect selected" + (selected.size ? " (" + selected.size + ")" : "");
    $("notice-selected").textContent = "Notice to selected" + (selected.size ? " (" + selected.size + ")" : "");
  }

  function setSort(key) {
    if (sortKey === key) sortDir = -sortDir;
    else { sortKey = key; sortDir = key === "started" || key === "bytes" || key === "duration" ? -1 : 1; }
    for (const th of document.querySelectorAll("th[data-key]")) {
      if (th.dataset.key === sortKey) th.setAttribute("aria-sort", sortDir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
    render();
  }

  // -- data --
  function learnSkew(list) {
    const s = list.find((x) => typeof x.duration_s === "number");
    if (s) skewMs = Date.parse(s.started_at) + s.duration_s * 1000 - Date.now();
  }

  function replaceAll(list) {
    sessions.clear();
    for (const s of list) sessions.set(s.id, s);
    learnSkew(list);
    render();
  }

  function showCluster(data) {
    const nodes = data.nodes ? Object.keys(data.nodes) : [];
    $("node").textContent = "\u00b7 node " + data.node + (nodes.length > 1 ? " (cluster of " + nodes.length + ")" : "");
    $("degraded").hidden = !data.degraded;
    $("degraded").textContent = data.degraded ? "The cluster view is unavailable (Redis): only this node's sessions are shown." : "";
  }

  async function refresh(quiet = false) {
    try {
      const data = await api("GET", "/v1/sessions");
      showCluster(data);
      replaceAll(data.sessions);
      if (!quiet) setStatus("Updated " + fmtDateTime(new Date()));
    } catch (e) {
      if (e.status === 401) return signOut("The gateway no longer accepts this token. Sign in again.");
      setStatus("Refresh failed: " + e.message, true);
    }
  }

  async function follow() {
    clearTimeout(retry);
    if (stream) stream.abort();
    stream = null;
    if (!token || !$("live").checked) return;
    const mine = (stream = new AbortController());
    try {
      const res = await fetch("/v1/events", { headers: { Authorization: "Bearer " + token }, signal: mine.signal, cache: "no-store", credentials: "omit" });
      if (res.status === 401) return signOut("The gateway no longer accepts this token. Sign in again.");
      if (!res.ok) throw new Error(res.statusText);
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const chunk = buf.slice(0, cut); buf = buf.slice(cut + 2);
          let kind = "message", data = "";
          for (const line of chunk.split("\n")) {
            if (line.startsWith("event: ")) kind = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
          }
          if (data) onEvent(kind, JSON.parse(data));
        }
      }
    } catch (e) {
      if (e.name === "AbortError") return;
    }
    if (stream === mine && $("live").checked) {
      setStatus("Live updates interrupted; reconnecting\u2026", true);
      retry = setTimeout(follow, 2000);
    }
  }

  function onEvent(kind, data) {
    if (kind === "snapshot") { replaceAll(data.sessions); return; }
    if (kind === "opened" || kind === "updated") {
      sessions.set(data.session.id, data.session);
      learnSkew([data.session]);
    } else if (kind === "closed") {
      const s = data.session;
      sessions.delete(s.id);
      selected.delete(s.id);
      // Any reason slug (node_lost from a cluster too) reads as words.
      $("feed").textContent = "Session " + shortId(s.id) + " of " + who(s) + " ended" + (data.reason ? ": " + String(data.reason).replace(/_/g, " ") : "") + ".";
    } else if (kind === "progress") {
      for (const p of data.sessions) {
        const s = sessions.get(p.id);
        if (s) { s.bytes_up = p.bytes_up; s.bytes_down = p.bytes_down; }
      }
    } else return;
    render();
  }

  // -- actions --
  async function copyId(id) {
    try {
      await navigator.clipboard.writeText(id);
      setStatus("Copied session ID " + id + ".");
    } catch (e) {
      setStatus("Could not copy; the session ID is " + id + ".", true);
    }
  }

  let pending = [];
  const describe = (ids) => ids.length === 1
    ? (sessions.get(ids[0]) ? who(sessions.get(ids[0])) + " (session " + shortId(ids[0]) + ")" : "session " + shortId(ids[0]))
    : ids.length + " sessions";

  function askDisconnect(ids) {
    if (!canAct() || !ids.length) return;
    pending = ids;
    $("confirm-text").textContent = "Disconnect " + describe(ids) + "? The users will read your reason.";
    $("reason").value = "";
    $("grace").value = "0";
    $("confirm").returnValue = "";
    $("confirm").showModal();
    $("reason").focus();
  }

  function askNotice(ids) {
    if (!canAct() || !ids.length) return;
    pending = ids;
    $("notice-text").textContent = "Send a notice to " + describe(ids) + ". It appears in their terminals.";
    $("message").value = "";
    $("notice").returnValue = "";
    $("notice").showModal();
    $("message").focus();
  }

  const atTime = (iso) => "at " + fmtDateTime(new Date(Date.parse(iso) - skewMs));

  async function doDisconnect(ids) {
    const grace = Number($("grace").value || 0);
    const reason = $("reason").value;
    const what = describe(ids); // before the answer: the session may be gone by then
    try {
      if (ids.length === 1) {
        const data = await api("DELETE", "/v1/sessions/" + encodeURIComponent(ids[0]), { reason, grace_s: grace });
        setStatus(data.result === "pending"
          ? what + " will be disconnected " + atTime(data.ends_at) + "."
          : "Disconnected " + what + ".");
      } else {
        const data = await api("POST", "/v1/sessions/disconnect", { ids, reason, grace_s: grace });
        const count = {};
        for (const r of Object.values(data.results)) count[r] = (count[r] || 0) + 1;
        const parts = Object.entries(count).map(([r, n]) => n + " " + r.replace(/_/g, " "));
        setStatus("Disconnect of " + ids.length + " sessions: " + parts.join(", ") + ".", !!(count.failed || count.node_unreachable));
      }
      for (const id of ids) selected.delete(id);
      render();
      if (!$("live").checked) await refresh(true);
    } catch (e) {
      if (e.status === 401) return signOut("The gateway no longer accepts this token. Sign in again.");
      setStatus("Disconnect failed: " + e.message, true);
    }
  }

  async function doNotice(ids) {
    try {
      const data = await api("POST", "/v1/notices", { message: $("message").value, ids });
      const results = Object.entries(data.results);
      const delivered = results.filter(([, r]) => r === "delivered").length;
      const other = results.filter(([, r]) => r !== "delivered").map(([id, r]) => shortId(id) + ": " + r.replace(/_/g, " "));
      setStatus("Notice delivered to " + delivered + " of " + results.length + (other.length ? " (" + other.join(", ") + ")" : "") + ".", other.length > 0);
    } catch (e) {
      if (e.status === 401) return signOut("The gateway no longer accepts this token. Sign in again.");
      setStatus("Notice failed: " + e.message, true);
    }
  }

  // -- sign-in and sign-out --
  function signOut(message) {
    token = ""; role = "";
    sessionStorage.removeItem(TOKEN_KEY);
    clearTimeout(retry);
    if (stream) stream.abort();
    stream = null;
    sessions.clear(); selected.clear();
    for (const row of rows.values()) row.tr.remove();
    rows.clear();
    $("rows").replaceChildren();
    $("main").hidden = true; $("signout").hidden = true; $("login").hidden = false;
    $("whoami").textContent = ""; $("node").textContent = ""; $("feed").textContent = "";
    $("token").value = "";
    $("login-error").textContent = message || "";
    $("token").setAttribute("aria-invalid", message ? "true" : "false");
    $("token").focus();
  }

  async function signIn(t) {
    if (!t) { $("login-error").textContent = "Enter a token."; return; }
    // A header cannot carry other characters; fetch would fail with a message that blames the network.
    if (!/^[\x21-\x7e]+$/.test(t)) { $("login-error").textContent = "A token is printable ASCII without spaces; check what was pasted."; return; }
    token = t;
    $("login-error").textContent = "";
    try {
      const me = await api("GET", "/v1/whoami");
      role = me.role;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token").value = "";
      $("token").setAttribute("aria-invalid", "false");
      $("login").hidden = true; $("main").hidden = false; $("signout").hidden = false;
      $("whoami").textContent = me.name + " (" + me.role + ")";
      $("node").textContent = "\u00b7 node " + me.node;
      // A viewer gets no control it cannot use: no selection, no bulk bar, no actions column.
      for (const e of document.querySelectorAll("th.select, th.actions")) e.hidden = !canAct();
      $("bulk").hidden = !canAct();
      setStatus("");
      await refresh(true);
      follow();
    } catch (e) {
      token = ""; role = "";
      sessionStorage.removeItem(TOKEN_KEY);
      $("login").hidden = false; $("main").hidden = true;
      $("token").setAttribute("aria-invalid", "true");
      $("login-error").textContent = e.status === 401
        ? "That token was not accepted. Check it and try again."
        : "Sign-in failed: " + e.message;
      $("token").select();
    }
  }

  $("login").addEventListener("submit", (ev) => { ev.preventDefault(); signIn($("token").value.trim()); });
  $("signout").addEventListener("click", () => signOut("Signed out."));
  $("refresh").addEventListener("click", () => refresh());
  $("live").addEventListener("change", () => { if ($("live").checked) refresh(true); follow(); });
  $("filter").addEventListener("input", () => {
    terms = $("filter").value.toLowerCase().split(/\s+/).filter(Boolean);
    render();
  });
  for (const th of document.querySelectorAll("th[data-key]")) {
    th.querySelector("button").title = "Sort by " + th.textContent.trim().toLowerCase();
    th.querySelector("button").addEventListener("click", () => setSort(th.dataset.key));
  }
  $("disconnect").addEventListener("click", () => askDisconnect([...selected]));
  $("notice-selected").addEventListener("click", () => askNotice([...selected]));
  for (const d of document.querySelectorAll("dialog")) {
    d.querySelector("button.cancel").addEventListener("click", () => d.close("cancel"));
  }
  $("confirm").addEventListener("close", () => { if ($("confirm").returnValue === "ok") doDisconnect(pending); });
  $("notice").addEventListener("close", () => { if ($("notice").returnValue === "ok") doNotice(pending); });
  $("all").addEventListener("change", () => {
    for (const row of rows.values()) {
      if (!row.tr.isConnected) continue;
      if ($("all").checked) selected.add(row.tr.dataset.id); else selected.delete(row.tr.dataset.id);
    }
    render();
  });
  setInterval(() => {
    for (const [id, row] of rows) if (row.tr.isConnected) tick(row, sessions.get(id));
  }, 1000);
  setSort("started"); setSort("started"); // newest first, with the header saying so
  if (token) signIn(token); else $("token").focus();
})();
