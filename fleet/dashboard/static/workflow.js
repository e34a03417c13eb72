// One workflow, live: a server-sent event stream sends the workflow's JSON whenever it
// changed; the page redraws its counters, budget gauge, phases and steps from it.
"use strict";

const rootId = document.body.dataset.rootId;
const showText = document.body.dataset.showText === "on";
const base = "/api/workflows/" + encodeURIComponent(rootId);
let current = null;
let openStep = null;

function stepRow(step) {
  const row = el("tr", { class: "step " + step.status, "data-task-id": step.task_id }, [
    el("td", {}, [step.task_id]),
    el("td", {}, [step.agent]),
    el("td", { class: "st" }, [step.status]),
    el("td", {}, [step.worker || ""]),
    el("td", {}, [fmtDuration(step.duration_s)]),
    el("td", {}, [step.tokens]),
    el("td", {}, [step.cost_usd !== null ? "$" + step.cost_usd : ""]),
    el("td", {}, [step.error || ""]),
  ]);
  row.addEventListener("click", () => showStep(step.task_id));
  return row;
}

const COLUMNS = [["c-id", "step"], ["c-agent", "agent"], ["c-st", "status"], ["c-worker", "worker"],
  ["c-num", "duration"], ["c-num", "tokens"], ["c-num", "cost"], ["c-err", "error"]];

function stepHead() {
  const fragment = document.createDocumentFragment();
  fragment.append(el("colgroup", {}, COLUMNS.map(([cls]) => el("col", { class: cls }))));
  fragment.append(el("thead", {}, [el("tr", {}, COLUMNS.map(([, name]) => el("th", {}, [name])))]));
  return fragment;
}

function findStep(taskId) {
  for (const phase of current ? current.phases : []) {
    for (const step of phase.steps) if (step.task_id === taskId) return [phase, step];
  }
  return [null, null];
}

function showStep(taskId) {
  openStep = taskId;
  const [phase, step] = findStep(taskId);
  const panel = document.getElementById("step-detail");
  if (!step) { panel.hidden = true; return; }
  const fields = [
    ["task id", step.task_id], ["phase", phase.name], ["agent", step.agent],
    ["status", step.status], ["worker", step.worker || "(not known)"],
    ["duration", fmtDuration(step.duration_s)], ["tokens", step.tokens],
    ["cost", step.cost_usd !== null ? "$" + step.cost_usd : "(not priced)"],
    ["error", step.error || "none"], ["rate-limit wait", step.rate_wait_s + " s"],
  ];
  const list = el("dl", {}, fields.flatMap(([name, value]) => [el("dt", {}, [name]), el("dd", {}, [value])]));
  const close = el("button", { type: "button", id: "close-step" }, ["close"]);
  close.addEventListener("click", () => { openStep = null; panel.hidden = true; closeLive(); });
  const parts = [el("h2", {}, ["Step " + step.task_id]), list];
  if (step.flower) parts.push(el("a", { href: step.flower, id: "flower-link", rel: "noreferrer" }, ["this task in Flower"]));
  if (showText) parts.push(el("h3", {}, ["output"]), outputOf(step.task_id));
  if (showOutput) parts.push(el("h3", {}, ["live output"]), liveOf(base, step.task_id));
  parts.push(close);
  panel.replaceChildren(...parts);
  panel.hidden = false;
}

// Output text only when the operator turned on dashboard_show_text; read once per step.
const outputs = new Map();

function outputOf(taskId) {
  const box = el("pre", { id: "step-output" }, [outputs.get(taskId) || "…"]);
  if (!outputs.has(taskId)) {
    api(base + "/steps/" + encodeURIComponent(taskId)).then((body) => {
      const text = body.output !== null ? body.output : "(" + body.output_note + ")";
      if (body.output !== null) outputs.set(taskId, text);
      box.textContent = text;
    }).catch((error) => { box.textContent = "(" + error.message + ")"; });
  }
  return box;
}

function gauge(wf) {
  const fill = document.getElementById("gauge-fill");
  const held = document.getElementById("gauge-held");
  const text = document.getElementById("gauge-text");
  const box = document.getElementById("gauge");
  const bar = budgetBar(wf);
  if (!bar) {
    fill.style.width = "0"; held.style.width = "0"; text.textContent = "no budget";
    box.classList.remove("high", "exhausted");
    return;
  }
  const [used, reserved, label, exhausted] = bar;
  fill.style.width = (used * 100).toFixed(1) + "%";
  held.style.width = (reserved * 100).toFixed(1) + "%";
  box.classList.toggle("high", used >= 0.9);
  box.classList.toggle("exhausted", exhausted);
  text.textContent = label;
}

function render(wf) {
  current = wf;
  const status = document.getElementById("status");
  status.textContent = wf.status;
  status.className = "badge " + wf.status;
  document.getElementById("cancel").disabled = wf.status !== "running";
  document.getElementById("started").textContent = fmtTime(wf.started_at);
  document.getElementById("duration").textContent = fmtDuration(wf.duration_s);
  document.getElementById("steps-done").textContent = wf.steps_done;
  document.getElementById("steps-failed").textContent = wf.steps_failed;
  document.getElementById("steps-in-flight").textContent = wf.steps_in_flight;
  document.getElementById("tokens").textContent = fmtTokens(wf);
  document.getElementById("money").textContent = fmtMoney(wf) || "not priced";
  document.getElementById("rate-waits").textContent =
    wf.rate_limited.count + " (" + wf.rate_limited.wait_s.toFixed(1) + " s)";
  const notes = [];
  if (wf.cancel_reason) notes.push("cancelled: " + wf.cancel_reason);
  if (wf.budget_exhausted) notes.push("budget exhausted: " + wf.budget_exhausted);
  document.getElementById("notes").textContent = notes.join(" · ");
  gauge(wf);
  document.getElementById("phases").replaceChildren(...wf.phases.map((phase) =>
    el("section", { class: "phase" }, [
      el("h2", {}, [phase.name + " ", el("small", {}, [fmtPhase(phase)])]),
      el("table", { class: "steps" }, [stepHead(), el("tbody", {}, phase.steps.map(stepRow))]),
    ])));
  document.getElementById("rate-list").replaceChildren(...wf.rate_waits.map((wait) =>
    el("tr", {}, [el("td", {}, [wait.limit]), el("td", {}, [wait.task_id || ""]), el("td", {}, [wait.wait_s + " s"])])));
  document.getElementById("rate-list-wrap").hidden = wf.rate_waits.length === 0;
  const logs = document.getElementById("logs");
  if (logs && wf.logs) logs.textContent = wf.logs.map((line) => line.level + " " + line.message).join("\n");
  if (openStep) showStep(openStep);
}

function follow() {
  const stream = new EventSource(apiUrl(base + "/events"));
  stream.onmessage = (message) => render(JSON.parse(message.data));
  stream.addEventListener("end", () => stream.close());
}

async function cancelWorkflow() {
  if (!window.confirm("Cancel workflow " + rootId + "? Running steps stop and nothing new starts.")) return;
  const note = document.getElementById("cancel-note");
  try {
    await api(base + "/cancel", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ reason: "cancelled from the dashboard" }),
    });
    note.textContent = "cancel sent; running steps stop within seconds";
  } catch (error) {
    note.textContent = "cancel failed: " + error.message;
  }
}

document.getElementById("cancel").addEventListener("click", cancelWorkflow);
for (const row of document.querySelectorAll("tr.step")) {
  row.addEventListener("click", () => showStep(row.dataset.taskId));
}
api(base).then(render).catch(() => {});
follow();
