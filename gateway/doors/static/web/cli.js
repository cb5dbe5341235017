// Approving a `bastion login`: the signed-in browser confirms the code the command printed.
"use strict";
(function () {
  const params = new URLSearchParams(location.search);
  const id = params.get("id") || "";
  const who = document.getElementById("cli-who");
  const form = document.getElementById("cli-form");
  const result = document.getElementById("cli-result");
  const signin = document.getElementById("cli-signin");

  async function start() {
    const me = await fetch("/api/me", { credentials: "same-origin" });
    if (me.status === 401) {
      who.textContent = "You are not signed in to the gateway. Sign in, then open this page again from the link bastion login printed.";
      signin.hidden = false;
      return;
    }
    const body = await me.json();
    who.textContent = "Signed in as " + body.user + ".";
    form.hidden = false;
    document.getElementById("cli-code").focus();
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const code = document.getElementById("cli-code").value;
    const resp = await fetch("/api/cli/approve", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-Requested-With": "bastion" },
      body: JSON.stringify({ id: id, code: code }),
    });
    if (resp.status === 204) {
      form.hidden = true;
      result.textContent = "Approved: bastion login on your computer has its certificate. You can close this page.";
      return;
    }
    let message = "The approval failed (" + resp.status + ").";
    try { message = (await resp.json()).message || message; } catch (e) { /* not JSON */ }
    result.textContent = message;
  });

  start().catch((e) => { who.textContent = "The gateway could not be reached: " + e; });
})();
