// A step's live output in its panel, only when the operator turned on dashboard_show_output:
// the step's output deltas over server-sent events. A dropped connection is resumed by the
// browser itself with Last-Event-ID (the last delta's stream id): nothing missed or doubled.
"use strict";

const showOutput = document.body.dataset.showOutput === "on";
const live = { taskId: null, source: null, attempt: null, text: "", note: "", box: null };

function foldDelta(delta) {
  if (live.attempt !== null && delta.attempt !== live.attempt) {
    live.text = "";
    live.note = "(run again from the start on another worker)";
  }
  live.attempt = delta.attempt;
  live.text = live.text.slice(0, delta.offset) + delta.text;
}

function drawLive() {
  if (live.box) live.box.textContent = (live.note ? live.note + "\n" : "") + (live.text || "…");
}

function closeLive() {
  if (live.source) live.source.close();
  Object.assign(live, { taskId: null, source: null, attempt: null, text: "", note: "", box: null });
}

// The panel's live-output box for a step; the stream is opened once per step shown.
function liveOf(base, taskId) {
  if (live.taskId !== taskId) {
    closeLive();
    live.taskId = taskId;
    const source = new EventSource(apiUrl(base + "/steps/" + encodeURIComponent(taskId) + "/live"));
    live.source = source;
    source.addEventListener("delta", (message) => { foldDelta(JSON.parse(message.data)); drawLive(); });
    source.addEventListener("end", () => { source.close(); if (!live.text) live.note = "(no output streamed)"; drawLive(); });
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED && !live.text) { live.note = "(no live output)"; drawLive(); }
    };
  }
  live.box = el("pre", { id: "step-live" }, []);
  drawLive();
  return live.box;
}
