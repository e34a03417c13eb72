// Shared helpers of the dashboard pages: building elements (text only, never HTML strings),
// calling the JSON API and formatting times, tokens and money the way the server does.
"use strict";

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  for (const child of children || []) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Absolute URLs from the origin: a page opened as http://user:pass@host/ must not build
// request URLs that carry the credentials (fetch refuses those).
function apiUrl(path) {
  return new URL(path, window.location.origin).toString();
}

async function api(path, options) {
  const response = await fetch(apiUrl(path), Object.assign({ credentials: "same-origin" }, options));
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function fmtTime(at) {
  if (!at) return "";
  const date = new Date(at * 1000);
  return date.toLocaleString(undefined, { hour12: false });
}

// Under a minute with decimals; past it whole seconds, rounded once (never "1 min 60 s").
function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 59.95) return seconds.toFixed(seconds < 10 ? 2 : 1) + " s";
  const total = Math.round(seconds);
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const rest = total % 60;
  return (hours ? hours + " h " : "") + minutes + " min " + rest + " s";
}

// A phase's progress: finished of all, and how many still run or were interrupted (an
// abandoned or cancelled run's steps that never got an outcome); "12 / 12" never hides them.
function fmtPhase(phase) {
  const count = (status) => phase.steps.filter((s) => s.status === status).length;
  const running = count("running"), interrupted = count("interrupted");
  const finished = phase.steps.length - running - interrupted;
  return finished + " / " + phase.step_count + " steps finished" + (running ? ", " + running + " running" : "")
    + (interrupted ? ", " + interrupted + " interrupted" : "");
}

// The budget as a bar: [consumed share, reserved share, label, exhausted] in the limited
// unit (dollars when there is a dollar limit); null without any limit.
function budgetBar(wf) {
  const budget = wf.budget;
  const exhausted = Boolean(wf.budget_exhausted || (budget && budget.is_exhausted));
  if (!budget || (budget.limit_tokens == null && budget.limit_usd == null)) return null;
  // The ledger's figures, or a reading logged while the run ran: a stopped run's last
  // reading shows no reservation as held, and says it is the last reading.
  const live = wf.budget_live;
  let used, held, label;
  if (budget.limit_usd != null) {
    const limit = Number(budget.limit_usd);
    used = limit > 0 ? Number(budget.consumed_usd || 0) / limit : 1;
    held = live && limit > 0 ? Number(budget.reserved_usd || 0) / limit : 0;
    label = "$" + (budget.consumed_usd || "0") + " of $" + budget.limit_usd;
    if (live && Number(budget.reserved_usd || 0) > 0) label += " ($" + budget.reserved_usd + " reserved)";
  } else {
    const limit = budget.limit_tokens;
    used = limit > 0 ? budget.consumed_tokens / limit : 1;
    held = live && limit > 0 ? (budget.reserved_tokens || 0) / limit : 0;
    label = budget.consumed_tokens + " of " + limit + " tokens";
    if (live && budget.reserved_tokens) label += " (" + budget.reserved_tokens + " reserved)";
  }
  const heldThen = Number(budget.reserved_tokens || 0) + Number(budget.reserved_usd || 0);
  if (!live && heldThen > 0) label += " (last reading)";
  used = Math.max(0, Math.min(1, used));
  held = Math.max(0, Math.min(1 - used, held));
  if (exhausted) label = "budget exhausted: " + label;
  return [used, held, label, exhausted];
}

function fmtTokens(row) {
  const limit = row.budget && row.budget.limit_tokens;
  return limit !== null && limit !== undefined ? row.tokens + " / " + limit : String(row.tokens);
}

function fmtMoney(row) {
  const limit = row.budget && row.budget.limit_usd;
  let text = row.cost_usd !== null && row.cost_usd !== undefined ? "$" + row.cost_usd : "";
  if (limit !== null && limit !== undefined) text += " / $" + limit;
  return text;
}

function localizeTimes(root) {
  for (const node of (root || document).querySelectorAll("time[data-at]")) {
    node.textContent = fmtTime(Number(node.dataset.at));
  }
}

document.addEventListener("DOMContentLoaded", () => localizeTimes(document));
