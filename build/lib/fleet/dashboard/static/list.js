// The workflow list: re-read /api/workflows every second and redraw the table.
"use strict";

function listRow(row) {
  const link = el("a", { href: "/workflows/" + encodeURIComponent(row.root_id) }, [row.root_id]);
  const cells = [
    link,
    el("span", { class: "badge " + row.status }, [row.status]),
    fmtTime(row.started_at),
    fmtDuration(row.duration_s),
    row.steps_done,
    row.steps_failed,
    row.steps_in_flight,
    fmtTokens(row),
    fmtMoney(row),
  ];
  return el("tr", { "data-root-id": row.root_id, class: "status-" + row.status },
    cells.map((cell) => el("td", {}, [cell])));
}

async function refreshList() {
  const body = document.getElementById("workflows");
  try {
    const rows = await api("/api/workflows");
    const fresh = rows.length
      ? rows.map(listRow)
      : [el("tr", { class: "empty" }, [el("td", { colspan: "9" }, ["no workflow logged yet"])])];
    body.replaceChildren(...fresh);
    const sources = await api("/api/sources");
    document.getElementById("sources").replaceChildren(...sources.map((source) =>
      el("span", { class: "source " + (source.ok ? "ok" : "down"), title: source.error || "readable" },
        [source.where + (source.ok ? "" : ": " + source.error)])));
  } catch (error) {
    body.dataset.error = String(error);
  }
}

setInterval(refreshList, 1000);
