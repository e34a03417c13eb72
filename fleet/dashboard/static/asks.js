// Questions workflows wait on (Workflow.ask): re-read /api/asks every 2 s and answer each
// with a form built from its JSON Schema. A boolean is answered with Approve / Reject; an
// object's fields get inputs (its one boolean, if any, becomes Approve / Reject); anything
// else is typed as JSON. On a workflow page only that workflow's questions are shown.
"use strict";

const askForms = new Map();

function askSection() {
  return document.getElementById("asks");
}

function resolved(schema, root) {
  if (schema && typeof schema.$ref === "string" && schema.$ref.startsWith("#/$defs/")) {
    return (root.$defs || {})[schema.$ref.slice(8)] || {};
  }
  return schema || {};
}

function inputFor(name, prop) {
  const label = prop.title || name;
  let input;
  if (Array.isArray(prop.enum)) {
    input = el("select", { name: name }, prop.enum.map((v) => el("option", { value: JSON.stringify(v) }, [String(v)])));
    return { node: el("label", {}, [label + " ", input]), read: () => JSON.parse(input.value) };
  }
  if (prop.type === "boolean") {
    input = el("input", { type: "checkbox", name: name });
    return { node: el("label", {}, [input, " " + label]), read: () => input.checked };
  }
  if (prop.type === "integer" || prop.type === "number") {
    input = el("input", { type: "number", name: name, step: prop.type === "integer" ? "1" : "any" });
    return { node: el("label", {}, [label + " ", input]), read: () => (input.value === "" ? undefined : Number(input.value)) };
  }
  if (prop.type === "string") {
    input = el("input", { type: "text", name: name, value: prop.default || "" });
    return { node: el("label", {}, [label + " ", input]), read: () => input.value };
  }
  input = el("textarea", { name: name, rows: "2", placeholder: "JSON" });
  return { node: el("label", {}, [label + " ", input]), read: () => (input.value.trim() === "" ? undefined : JSON.parse(input.value)) };
}

// The form's inputs and buttons: each button answers with what read(choice) returns.
function formParts(schema) {
  const root = schema || {};
  const top = resolved(root, root);
  if (top.type === "boolean") {
    return { fields: [], buttons: [["Approve", true], ["Reject", false]], read: (choice) => choice };
  }
  if (top.type === "object" && top.properties) {
    const names = Object.keys(top.properties);
    const props = Object.fromEntries(names.map((n) => [n, resolved(top.properties[n], root)]));
    const flags = names.filter((n) => props[n].type === "boolean");
    const decision = flags.length === 1 ? flags[0] : null;
    const inputs = names.filter((n) => n !== decision).map((n) => [n, inputFor(n, props[n])]);
    const read = (choice) => {
      const value = {};
      for (const [n, input] of inputs) {
        const v = input.read();
        if (v !== undefined) value[n] = v;
      }
      if (decision) value[decision] = choice;
      return value;
    };
    const buttons = decision ? [["Approve", true], ["Reject", false]] : [["Answer", null]];
    return { fields: inputs.map(([, input]) => input.node), buttons: buttons, read: read };
  }
  const any = inputFor("answer", {});
  return { fields: [any.node], buttons: [["Answer", null]], read: () => any.read() };
}

function askForm(item) {
  const note = el("p", { class: "note ask-note" }, [item.note || ""]);
  const parts = formParts(item.schema);
  const buttons = parts.buttons.map(([label, choice]) => {
    const button = el("button", { type: "button", class: "answer", "data-choice": String(choice) }, [label]);
    button.addEventListener("click", () => sendAnswer(item, parts, choice, form, note));
    return button;
  });
  const deadline = item.deadline ? "answer before " + fmtTime(item.deadline) : "no deadline";
  const head = el("div", { class: "ask-head" }, [
    el("a", { href: "/workflows/" + encodeURIComponent(item.root_id) }, [item.root_id]),
    " · " + item.name + " · asked " + fmtTime(item.asked_at) + " · " + deadline,
  ]);
  const form = el("form", { class: "ask", "data-root-id": item.root_id, "data-name": item.name }, [
    head,
    el("p", { class: "question" }, [item.question || ""]),
    ...parts.fields,
    el("div", { class: "ask-buttons" }, buttons),
    note,
  ]);
  form.addEventListener("submit", (event) => event.preventDefault());
  return form;
}

async function sendAnswer(item, parts, choice, form, note) {
  let value;
  try {
    value = parts.read(choice);
  } catch (error) {
    note.textContent = "not JSON: " + error.message;
    return;
  }
  for (const button of form.querySelectorAll("button")) button.disabled = true;
  const path = "/api/workflows/" + encodeURIComponent(item.root_id) + "/asks/" + encodeURIComponent(item.name);
  try {
    const body = await api(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(value),
    });
    form.classList.add("answered");
    form.dataset.answeredBy = body.by;
    form.dataset.answeredAt = String(Date.now());
    note.textContent = "answered by " + body.by + (body.model
      ? "; the program checks it with its model " + body.model + " when it reads it: if that refuses it, the question comes back here with the reason"
      : "");
  } catch (error) {
    note.textContent = error.message;
    for (const button of form.querySelectorAll("button")) button.disabled = false;
  }
}

async function refreshAsks() {
  const section = askSection();
  if (!section) return;
  const only = section.dataset.rootId || null;
  const readAt = Date.now();
  let items;
  try {
    items = (await api("/api/asks")).items.filter((item) => !only || item.root_id === only);
  } catch (error) {
    section.dataset.error = String(error);
    return;
  }
  const keys = new Set();
  const list = document.getElementById("ask-list");
  for (const item of items) {
    const key = item.root_id + "\u0000" + item.name;
    keys.add(key);
    const shown = askForms.get(key);
    // Listed again after it was answered (and read after the answer was sent): the
    // program's model refused the answer; a fresh form shows the question and the reason.
    const reopened = shown && shown.classList.contains("answered") && Number(shown.dataset.answeredAt) < readAt;
    if (!shown || reopened) {
      const form = askForm(item);
      askForms.set(key, form);
      if (shown) shown.replaceWith(form);
      else list.append(form);
    }
  }
  for (const [key, form] of askForms) {
    if (!keys.has(key) && !form.classList.contains("answered")) {
      form.remove();
      askForms.delete(key);
    }
  }
  section.hidden = askForms.size === 0;
}

document.addEventListener("DOMContentLoaded", () => {
  refreshAsks();
  setInterval(refreshAsks, 2000);
});
