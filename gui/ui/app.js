// hostnet settings window: every action is one command, every command one admin-API request.
const invoke = (cmd, args) => window.__TAURI__.core.invoke(cmd, args);
const $ = (id) => document.getElementById(id);

function banner(text) {
  $("banner").hidden = !text;
  $("banner").textContent = text || "";
}

function render(view) {
  $("enabled").checked = view.enabled;
  banner(view.banner || (view.errors.length ? view.errors.join(" · ") : null));
  $("path").textContent = "Settings file: " + view.settings_path;
  const rows = view.forwards.map((f) => {
    const tr = document.createElement("tr");
    const port = f.guest_port === f.host_port ? String(f.host_port) : `${f.guest_port} → ${f.host_port}`;
    for (const text of [f.proto, f.direction, port]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    const state = document.createElement("td");
    state.className = "state-" + f.state;
    state.textContent = f.state;
    if (f.reason) {
      const r = document.createElement("span");
      r.className = "reason";
      r.textContent = f.reason;
      state.appendChild(r);
    }
    tr.appendChild(state);
    const conns = document.createElement("td");
    conns.textContent = f.connections;
    tr.appendChild(conns);
    return tr;
  });
  const body = $("forwards");
  body.replaceChildren(...rows);
  const limits = view.limits || [];
  $("limits").hidden = !limits.length;
  $("limits").replaceChildren(...limits.map((l) => { const li = document.createElement("li"); li.textContent = l; return li; }));
  $("streams").hidden = !view.streams;
  $("streams").textContent = view.streams || "";
  if (!rows.length) body.innerHTML = '<tr><td colspan="5" class="muted">No forwards: nothing listens in the VM yet.</td></tr>';
}

function showError(e) {
  if (e && e.kind === "not_running") {
    banner(e.message);
    $("forwards").innerHTML = '<tr><td colspan="5" class="muted">hostnet is not running.</td></tr>';
  } else if (e && e.field) {
    const p = document.querySelector(`.error[data-for="${e.field}"]`);
    if (p) p.textContent = e.message;
    const input = $(e.field);
    if (input) input.setAttribute("aria-invalid", "true");
  } else {
    banner(e && e.message ? e.message : String(e));
  }
}

async function refresh() {
  try { render(await invoke("get_status")); } catch (e) { showError(e); }
}

$("enabled").addEventListener("change", async (ev) => {
  try { render(await invoke("set_enabled", { enabled: ev.target.checked })); } catch (e) { showError(e); refresh(); }
});

$("bind").addEventListener("change", () => { $("bind-warning").hidden = $("bind").value !== "all"; });
$("other_users").addEventListener("change", () => { $("other-users-warning").hidden = !$("other_users").checked; });

function parseList(text) { return text.split(/[\s,]+/).filter(Boolean); }

async function loadSettings() {
  try {
    const s = await invoke("get_settings");
    $("bind").value = s.bind; $("bind-warning").hidden = s.bind !== "all";
    $("udp").checked = s.udp; $("guest_to_host").checked = s.guest_to_host;
    $("ignore_ports").value = s.ignore_ports.join(", ");
    $("remap").value = Object.entries(s.remap).map(([g, h]) => `${g}=${h}`).join(", ");
    const policy = s.guest_to_host_policy || {};
    $("allow_ports").value = (policy.allow_ports || []).join(", ");
    $("deny_ports").value = (policy.deny_ports || []).join(", ");
    $("only_allowed").checked = !!policy.only_allowed;
    $("other_users").checked = !!policy.other_users; $("other-users-warning").hidden = !policy.other_users;
    $("take_freed_ports").checked = !!s.take_freed_ports;
    window.currentSettings = s;
  } catch (e) { showError(e); }
}

$("settings").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  document.querySelectorAll(".error").forEach((p) => (p.textContent = ""));
  document.querySelectorAll("[aria-invalid]").forEach((i) => i.removeAttribute("aria-invalid"));
  const remap = {};
  for (const pair of parseList($("remap").value)) {
    const [g, h] = pair.split("=");
    const host = Number(h);
    if (!g || !Number.isInteger(host)) { showError({ field: "remap", message: `"${pair}" is not guest=host` }); return; }
    remap[g.trim()] = host;
  }
  // Keys the form does not show (the limits, …) keep their values.
  const current = window.currentSettings || {};
  const settings = {
    ...current,
    enabled: $("enabled").checked, bind: $("bind").value, udp: $("udp").checked,
    guest_to_host: $("guest_to_host").checked, ignore_ports: parseList($("ignore_ports").value), remap,
    take_freed_ports: $("take_freed_ports").checked,
    guest_to_host_policy: {
      ...(current.guest_to_host_policy || {}),
      allow_ports: parseList($("allow_ports").value), deny_ports: parseList($("deny_ports").value),
      only_allowed: $("only_allowed").checked, other_users: $("other_users").checked,
    },
  };
  try {
    render(await invoke("update_settings", { settings }));
    window.currentSettings = settings;
    $("saved").textContent = "Saved.";
  } catch (e) { showError(e); }
});

loadSettings();
refresh();
setInterval(refresh, 1000);
