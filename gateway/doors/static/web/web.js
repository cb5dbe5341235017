"use strict";
// The web terminal page. The session cookie (HttpOnly, SameSite=Strict) authenticates every request and the
// WebSocket; state-changing requests carry X-Requested-With so the gateway can tell them from a cross-site
// form. Everything that came from the server or the inventory is set as text, never as HTML.
(() => {
  const $ = (id) => document.getElementById(id);
  const encoder = new TextEncoder();
  const views = ["loading", "signin", "list", "term-view"];
  let me = null;            // the /api/me answer while signed in
  let expiryTimer = 0;
  let conn = null;          // the open terminal: { term, fit, ws, ended, observer }

  const show = (view) => {
    for (const v of views) $(v).hidden = v !== view;
    $("who").hidden = view === "signin" || view === "loading";
  };

  async function api(method, path) {
    const res = await fetch(path, {
      method,
      headers: method === "GET" ? {} : { "X-Requested-With": "bastion" },
      cache: "no-store",
      credentials: "same-origin",
    });
    const data = res.status === 204 ? {} : await res.json().catch(() => ({}));
    if (!res.ok) {
      const err = new Error(data.message || res.statusText || "HTTP " + res.status);
      err.status = res.status;
      err.data = data;
      throw err;
    }
    return data;
  }

  // ---- sign-in ---------------------------------------------------------------------------------------

  function showSignIn(oidc, error) {
    me = null;
    clearTimeout(expiryTimer);
    $("oidc").hidden = !oidc;
    const port = location.port || (location.protocol === "https:" ? "443" : "80");
    $("ssh-command").textContent = "ssh -p " + port + " USER@" + location.hostname + " web";
    $("link-or").textContent = oidc ? "Or run " : "Run ";
    $("signin-error").textContent = error || "";
    $("signin-error").hidden = !error;
    $("retry").hidden = !error;
    $("user").textContent = "";
    show("signin");
  }

  async function start() {
    try {
      me = await api("GET", "/api/me");
    } catch (e) {
      if (e.status === 401) return showSignIn(!!(e.data && e.data.oidc));
      return showSignIn(false, "The gateway did not answer: " + e.message);
    }
    $("user").textContent = me.user;
    $("user").title = [
      (me.groups || []).length ? "Groups: " + me.groups.join(", ") : "No groups",
      "Signed in with " + (me.auth_method === "oidc" ? "your identity provider" : "a one-time link"),
      me.expires_at ? "Until " + new Date(me.expires_at).toLocaleString() : "",
    ].filter(Boolean).join("\n");
    watchExpiry();
    await showList();
  }

  // When the browser session runs out, go back to the sign-in view (the gateway ends open terminals itself).
  function watchExpiry() {
    clearTimeout(expiryTimer);
    const left = me && me.expires_at ? Date.parse(me.expires_at) - Date.now() : NaN;
    if (!Number.isFinite(left)) return;
    expiryTimer = setTimeout(() => { if (!conn) start(); }, Math.min(Math.max(left + 1000, 1000), 2 ** 31 - 1));
  }

  async function signOut() {
    $("signout").disabled = true;
    closeTerminal();
    try {
      await api("POST", "/logout");
    } catch (e) {
      if (e.status !== 401) {  // already signed out is fine; anything else is worth saying
        $("signout").disabled = false;
        alert("Sign-out failed: " + e.message);
        return;
      }
    }
    $("signout").disabled = false;
    await start();
  }

  // ---- the VM list -----------------------------------------------------------------------------------

  async function showList() {
    show("list");
    $("list-status").textContent = "Loading your VMs…";
    let data;
    try {
      data = await api("GET", "/api/vms");
    } catch (e) {
      if (e.status === 401) return start();
      $("vms").replaceChildren();
      $("list-status").textContent = "Could not load your VMs: " + e.message;
      return;
    }
    renderVms(data.vms || []);
  }

  function renderVms(vms) {
    const list = $("vms");
    list.replaceChildren();
    $("list-status").textContent = vms.length ? "" : "No VMs are available to you.";
    vms.forEach((vm, index) => {
      const li = document.createElement("li");
      li.dataset.vm = vm.name;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = vm.name;
      li.append(name);

      const logins = vm.logins || [];
      let pick = () => logins[0];
      if (logins.length > 1) {
        const id = "login-" + index;
        const label = document.createElement("label");
        label.htmlFor = id;
        label.textContent = "as";
        const select = document.createElement("select");
        select.id = id;
        select.className = "login";
        for (const login of logins) {
          const opt = document.createElement("option");
          opt.value = login;
          opt.textContent = login;
          select.append(opt);
        }
        select.value = logins.includes(vm.default_login) ? vm.default_login : logins[0];
        pick = () => select.value;
        li.append(label, select);
      } else {
        const as = document.createElement("span");
        as.className = "as";
        as.textContent = logins.length ? "as " + logins[0] : "no login allowed";
        li.append(as);
      }

      const open = document.createElement("button");
      open.type = "button";
      open.className = "open primary";
      open.textContent = "Open terminal";
      open.disabled = logins.length === 0;
      open.setAttribute("aria-label", "Open terminal on " + vm.name);
      open.addEventListener("click", () => openTerminal(vm.name, pick()));
      li.append(open);
      list.append(li);
    });
    const first = list.querySelector("button.open:not(:disabled)");
    if (first) first.focus();
  }

  // ---- the terminal ----------------------------------------------------------------------------------

  const themes = {
    light: { background: "#ffffff", foreground: "#1b1f24", cursor: "#1b1f24", cursorAccent: "#ffffff", selectionBackground: "#b6d6fd" },
    dark: { background: "#0d1117", foreground: "#e6edf3", cursor: "#e6edf3", cursorAccent: "#0d1117", selectionBackground: "#264f78" },
  };
  const darkQuery = window.matchMedia("(prefers-color-scheme: dark)");
  const theme = () => (darkQuery.matches ? themes.dark : themes.light);
  darkQuery.addEventListener("change", () => { if (conn) conn.term.options.theme = theme(); });

  function setBanner(kind, text) {
    const banner = $("banner");
    banner.dataset.kind = kind;
    banner.setAttribute("role", kind === "ended" ? "alert" : "status");
    $("banner-text").textContent = text;
    $("banner-dismiss").hidden = kind !== "notice";
    $("banner-back").hidden = kind !== "ended";
    banner.hidden = false;
  }

  function hideBanner() {
    $("banner").hidden = true;
    delete $("banner").dataset.kind;
  }

  function openTerminal(vm, login) {
    closeTerminal();
    hideBanner();
    show("term-view");
    $("term-title").textContent = vm + " as " + login;
    $("term-state").textContent = "Connecting…";
    $("close-term").hidden = false;

    const term = new window.Terminal({
      scrollback: 5000,
      convertEol: false,
      cursorBlink: true,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace',
      fontSize: 14,
      theme: theme(),
    });
    const fit = new window.FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open($("terminal"));
    fit.fit();

    const params = new URLSearchParams({ vm, login, cols: String(term.cols), rows: String(term.rows) });
    // wss on the real gateway (the page is only served over TLS); ws only when a test serves it over http.
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(scheme + location.host + "/ws/terminal?" + params);
    ws.binaryType = "arraybuffer";
    const c = { term, fit, ws, ended: false, sent: { cols: term.cols, rows: term.rows }, observer: null };
    conn = c;

    const sendSize = () => {
      if (ws.readyState !== WebSocket.OPEN) return;
      if (c.sent.cols === term.cols && c.sent.rows === term.rows) return;
      c.sent = { cols: term.cols, rows: term.rows };
      ws.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
    };
    term.onResize(sendSize);
    // Keys typed while the gateway logs in to the VM are kept (up to 4 KiB) and sent once the socket opens.
    const early = [];
    let earlyBytes = 0;
    term.onData((data) => {
      const bytes = encoder.encode(data);
      if (ws.readyState === WebSocket.OPEN) ws.send(bytes);
      else if (ws.readyState === WebSocket.CONNECTING && earlyBytes + bytes.length <= 4096) {
        early.push(bytes);
        earlyBytes += bytes.length;
      }
    });
    ws.addEventListener("open", () => {
      for (const bytes of early.splice(0)) ws.send(bytes);
    });
    // Some mouse reports are raw bytes, not UTF-8 text.
    term.onBinary((data) => {
      if (ws.readyState !== WebSocket.OPEN) return;
      const bytes = new Uint8Array(data.length);
      for (let i = 0; i < data.length; i++) bytes[i] = data.charCodeAt(i) & 0xff;
      ws.send(bytes);
    });
    // Ctrl-C, Ctrl-D, ... go to the VM; Ctrl-Shift-C copies the selection and Ctrl-Shift-V is left to the
    // browser, whose paste event xterm turns into input (bracketed when the program asked for it).
    term.attachCustomKeyEventHandler((ev) => {
      if (ev.type !== "keydown" || !ev.ctrlKey || !ev.shiftKey || ev.altKey || ev.metaKey) return true;
      if (ev.code === "KeyC") {
        if (term.hasSelection() && navigator.clipboard) navigator.clipboard.writeText(term.getSelection()).catch(() => {});
        ev.preventDefault();
        return false;
      }
      return ev.code !== "KeyV";
    });

    // The fit addon follows the box, which follows the window (and the banner never changes its size).
    let pending = 0;
    c.observer = new ResizeObserver(() => {
      cancelAnimationFrame(pending);
      pending = requestAnimationFrame(() => { if (conn === c) c.fit.fit(); });
    });
    c.observer.observe($("terminal"));

    ws.addEventListener("open", () => {
      if (conn !== c) return;
      $("term-state").textContent = "";
      sendSize();  // the box may have changed while connecting
    });
    ws.addEventListener("message", (ev) => {
      if (conn !== c) return;
      if (typeof ev.data !== "string") {
        term.write(new Uint8Array(ev.data));
        return;
      }
      let msg;
      try { msg = JSON.parse(ev.data); } catch { return; }
      if (msg.type === "notice") {
        if (!c.ended) setBanner("notice", String(msg.message));
      } else if (msg.type === "ended") {
        c.ended = true;
        setBanner("ended", String(msg.message));
      }
    });
    ws.addEventListener("close", (ev) => {
      if (conn !== c) return;
      $("term-state").textContent = "Disconnected";
      $("close-term").hidden = true;
      term.options.cursorBlink = false;
      term.options.disableStdin = true;
      if (!c.ended) {
        c.ended = true;
        setBanner("ended", "The connection to the gateway was lost (code " + ev.code + ")" + (ev.reason ? ": " + ev.reason : ""));
      }
      // Typing goes nowhere now: put the keyboard on the way out, unless the user is busy elsewhere.
      const active = document.activeElement;
      if (!active || active === document.body || $("terminal").contains(active)) $("banner-back").focus();
    });
    term.focus();
  }

  function closeTerminal() {
    const c = conn;
    if (!c) return;
    conn = null;
    c.observer.disconnect();
    if (c.ws.readyState === WebSocket.CONNECTING || c.ws.readyState === WebSocket.OPEN) c.ws.close(1000, "closed by the user");
    c.term.dispose();
    $("terminal").replaceChildren();
    hideBanner();
  }

  async function backToList() {
    closeTerminal();
    await showList();
  }

  // Read-only hook for browser tests: the lines the terminal shows right now.
  window.bastionTerminalText = () => {
    if (!conn) return "";
    const buf = conn.term.buffer.active;
    const lines = [];
    for (let i = buf.viewportY; i < buf.viewportY + conn.term.rows; i++) {
      const line = buf.getLine(i);
      lines.push(line ? line.translateToString(true) : "");
    }
    return lines.join("\n");
  };

  window.addEventListener("beforeunload", (ev) => {
    if (conn && !conn.ended) { ev.preventDefault(); ev.returnValue = ""; }  // a stray Ctrl-W would kill the session
  });

  $("signout").addEventListener("click", signOut);
  $("retry").addEventListener("click", () => { show("loading"); start(); });
  $("close-term").addEventListener("click", backToList);
  $("banner-back").addEventListener("click", backToList);
  $("banner-dismiss").addEventListener("click", () => {
    hideBanner();
    if (conn && !conn.ended) conn.term.focus();
  });
  start();
})();
