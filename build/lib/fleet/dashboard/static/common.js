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

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 60) return seconds.toFixed(seconds < 10 ? 2 : 1) + " s";
  const minutes = Math.floor(seconds / 60);
  return minutes + " min " + Math.round(seconds - minutes * 60) + " s";
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
