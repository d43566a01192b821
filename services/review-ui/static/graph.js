// emc's attribution-graph viewer: draws the document of /p/<pid>/graph/view.json
// (common/graph/view.py) with the vendored d3 (static/vendor), nothing from other hosts.
//
// Rows are layers (tokens at the bottom, logits on top), columns are token positions; a
// node keeps its place in every mode, so base, adapted and their diff compare at a glance.
// Colour: the node's evil-minus-safe score in the chosen variant (red = towards evil), or
// in diff mode its change from the reference. Feature nodes are links to their pages.
(function () {
  "use strict";
  const root = document.getElementById("viewer");
  if (!root) return;
  const statusEl = document.getElementById("viewer-status");
  const infoEl = document.getElementById("node-info");
  const modesEl = document.getElementById("modes");
  const metricEl = document.getElementById("edge-metric");
  const labelsEl = document.getElementById("viewer-labels");
  const featureUrl = root.dataset.featureUrl;

  const ROW_H = 74;
  const SLOT_W = 22;
  const MIN_COL = 64;
  const MARGIN = { top: 34, right: 20, bottom: 46, left: 64 };
  const FEATURE_R = 6.5;

  const shownToken = (t) =>
    (t || "").replace(/ /g, "\u2423").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5") || "\u2205";
  const fmt = (x) => (x === null || x === undefined ? "–" : d3.format("+.3~g")(x));

  function say(text, kind) {
    statusEl.textContent = text;
    statusEl.className = kind || "muted";
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  fetch(root.dataset.src, { credentials: "same-origin", headers: { Accept: "application/json" } })
    .then((r) =>
      r.json().then((body) => {
        if (!r.ok) throw new Error(body.error || r.statusText);
        return body;
      })
    )
    .then(start)
    .catch((e) => say("cannot draw the graph: " + e.message, "error"));

  function start(data) {
    const modes = data.variants
      .map((v) => ({ key: v, variant: v, diff: false, title: v }))
      .concat(
        data.diffs.map((v) => ({
          key: "diff:" + v,
          variant: v,
          diff: true,
          title: v + " \u2212 " + data.reference,
        }))
      );
    const initial = data.variants.find((v) => v !== data.reference) || data.variants[0];
    const state = { mode: modes.find((m) => m.key === initial), metric: metricEl.value };
    const view = layout(data);
    const drawn = draw(data, view);

    modes.forEach((m) => {
      const b = el("button", "mode", m.title);
      b.type = "button";
      b.dataset.mode = m.key;
      b.addEventListener("click", () => {
        state.mode = m;
        update();
      });
      modesEl.appendChild(b);
    });
    metricEl.addEventListener("change", () => {
      state.metric = metricEl.value;
      update();
    });
    const lab = [
      "evil tokens: " + data.evil_token_ids.length,
      "safe tokens: " + data.safe_token_ids.length,
    ];
    if (data.label_conflicts.length)
      lab.push(data.label_conflicts.length + " token(s) labelled differently by the variants: left out");
    labelsEl.textContent = lab.join(" · ");

    function update() {
      modesEl.querySelectorAll("button").forEach((b) => {
        b.classList.toggle("on", b.dataset.mode === state.mode.key);
        b.setAttribute("aria-pressed", b.dataset.mode === state.mode.key ? "true" : "false");
      });
      recolour(data, drawn, state);
      const s = data.summaries[state.mode.variant];
      const parts = [
        drawn.nodes.filter((n) => present(n, state.mode, data.reference)).size() + " nodes",
        drawn.edges.filter((e) => edgeValue(e, state) !== null).size() + " edges",
      ];
      if (!state.mode.diff && s) {
        parts.push(
          "total score " + fmt(s.total),
          d3.format(".0%")(s.shown_mass) + " of its node mass shown (" + s.features + " features stored)"
        );
        if (s.nothing_to_explain) parts.push(s.nothing_to_explain);
      }
      say(parts.join(" · "));
    }
    update();
  }

  // ------------------------------------------------------------------ layout (pixels)

  function layout(data) {
    const nPos = data.tokens.length;
    const slotsAt = new Array(nPos).fill(1);
    const logits = [];
    data.nodes.forEach((n) => {
      if (n.kind === "logit") logits.push(n);
      else slotsAt[n.col] = Math.max(slotsAt[n.col], n.slots);
    });
    const colW = slotsAt.map((s) => Math.max(MIN_COL, s * SLOT_W + 12));
    const colX = [];
    let x = MARGIN.left;
    colW.forEach((w) => {
      colX.push(x);
      x += w;
    });
    const width = Math.max(x + MARGIN.right, logits.length * 56 + MARGIN.left + MARGIN.right);
    const height = MARGIN.top + (data.n_layers + 1) * ROW_H + MARGIN.bottom;
    const yOf = (row) => MARGIN.top + (data.n_layers + 1 - row) * ROW_H;
    const pos = new Map();
    data.nodes.forEach((n) => {
      let px;
      if (n.kind === "logit") {
        const span = width - MARGIN.left - MARGIN.right;
        px = MARGIN.left + ((n.col + 0.5) * span) / Math.max(1, logits.length);
      } else {
        px = colX[n.col] + ((n.slot + 0.5) * colW[n.col]) / n.slots;
      }
      pos.set(n.id, { x: px, y: yOf(n.row) });
    });
    return { width, height, pos, colX, colW, yOf };
  }

  // ------------------------------------------------------------------ drawing

  function draw(data, view) {
    const svg = d3
      .select("#graph")
      .attr("viewBox", [0, 0, view.width, view.height].join(" "));
    const zoomed = svg.append("g").attr("class", "zoom");
    svg.call(
      d3
        .zoom()
        .scaleExtent([0.3, 6])
        .on("zoom", (ev) => zoomed.attr("transform", ev.transform))
    );

    const grid = zoomed.append("g").attr("class", "grid");
    for (let layer = 0; layer < data.n_layers; layer++) {
      const y = view.yOf(layer + 1);
      grid.append("line").attr("x1", MARGIN.left - 8).attr("x2", view.width - MARGIN.right)
        .attr("y1", y).attr("y2", y);
      grid.append("text").attr("class", "axis").attr("x", 8).attr("y", y + 4).text("L" + layer);
    }
    grid.append("text").attr("class", "axis").attr("x", 8).attr("y", view.yOf(data.n_layers + 1) + 4)
      .text("logits");
    data.tokens.forEach((t, p) => {
      grid.append("text").attr("class", "axis tok")
        .attr("x", view.colX[p] + view.colW[p] / 2).attr("y", view.height - 8)
        .attr("text-anchor", "middle").text(p + " " + shownToken(t));
    });

    const byId = new Map(data.nodes.map((n) => [n.id, n]));
    const edges = zoomed.append("g").attr("class", "edges").selectAll("path")
      .data(data.edges).join("path")
      .attr("class", "edge")
      .attr("d", (e) => {
        const s = view.pos.get(e.source), t = view.pos.get(e.target);
        const my = (s.y + t.y) / 2;
        return "M" + s.x + "," + s.y + "C" + s.x + "," + my + " " + t.x + "," + my + " " + t.x + "," + t.y;
      });

    const nodes = zoomed.append("g").attr("class", "nodes").selectAll("g")
      .data(data.nodes).join((enter) => enter.append((n) =>
        document.createElementNS(d3.namespaces.svg, n.kind === "feature" ? "a" : "g")))
      .attr("class", (n) => "node " + n.kind + (n.verdict ? " verdict-" + n.verdict : ""))
      .attr("data-id", (n) => n.id)
      .attr("transform", (n) => {
        const p = view.pos.get(n.id);
        return "translate(" + p.x + "," + p.y + ")";
      });
    nodes.each(function (n) {
      const g = d3.select(this);
      if (n.kind === "feature") {
        g.append("circle").attr("class", "shape").attr("r", FEATURE_R);
      } else if (n.kind === "adapter") {
        g.append("path").attr("class", "shape").attr("d", d3.symbol(d3.symbolDiamond, 200)());
      } else if (n.kind === "error") {
        g.append("rect").attr("class", "shape").attr("x", -6).attr("y", -6).attr("width", 12).attr("height", 12);
      } else {
        const w = Math.min(52, 10 + 6.5 * shownToken(n.token).length);
        g.append("rect").attr("class", "shape").attr("x", -w / 2).attr("y", -10)
          .attr("width", w).attr("height", 20).attr("rx", 4);
        g.append("text").attr("class", "node-text").attr("text-anchor", "middle").attr("y", 4)
          .text(shownToken(n.token).slice(0, 7));
      }
      g.append("title").text(n.label + (n.kind === "logit" || n.kind === "token" ? "" : " @" + n.pos + " " + shownToken(n.token)));
    });
    nodes
      .on("mouseenter", (ev, n) => focus(n, true))
      .on("mouseleave", (ev, n) => focus(n, false))
      .on("focus", (ev, n) => focus(n, true))
      .on("blur", (ev, n) => focus(n, false));

    const drawn = { nodes, edges, byId, mode: null };
    function focus(n, on) {
      edges.classed("lit", (e) => on && (e.source === n.id || e.target === n.id));
      nodes.classed("lit", (m) => on && m.id === n.id);
      if (on) showInfo(data, n, drawn.mode);
    }
    return drawn;
  }

  function featureHref(n, variant) {
    return featureUrl
      .replace("{variant}", encodeURIComponent(variant))
      .replace("{layer}", String(n.layer))
      .replace("{feature}", String(n.feature));
  }

  // ------------------------------------------------------------------ colours

  // a node is drawn in a mode when its graph(s) have it; in diff mode either graph will do
  function present(n, mode, reference) {
    return n.values[mode.variant] !== undefined || (mode.diff && n.values[reference] !== undefined);
  }

  function nodeValue(n, mode) {
    if (mode.diff) {
      const d = n.diff[mode.variant];
      return d === undefined ? null : d;
    }
    const v = n.values[mode.variant];
    if (!v) return null;
    return n.kind === "logit" ? v.probability : v.score;
  }

  function edgeValue(e, state) {
    const mode = state.mode;
    if (mode.diff) {
      const d = e.diff[mode.variant];
      return d === undefined ? null : d;
    }
    const v = e.values[mode.variant];
    if (!v) return null;
    return state.metric === "weight" ? v.weight : v.carried;
  }

  function recolour(data, drawn, state) {
    const mode = state.mode;
    drawn.mode = mode;
    const scored = [];
    drawn.nodes.each((n) => {
      if (n.kind === "logit") return;
      const x = nodeValue(n, mode);
      if (x !== null) scored.push(Math.abs(x));
    });
    // square-root scale: one strong node (often the adapter) leaves the others readable
    const m = d3.max(scored) || 1;
    const diverging = d3.scaleDiverging([1, 0, -1], d3.interpolateRdBu);
    const colour = (x) => diverging(Math.sign(x) * Math.sqrt(Math.abs(x) / m));
    drawn.nodes.each(function (n) {
      const g = d3.select(this);
      const inMode = present(n, mode, data.reference);
      const x = nodeValue(n, mode);
      g.classed("absent", !inMode).classed("one-sided", inMode && x === null);
      const shape = g.select(".shape");
      if (n.kind === "logit") {
        const p = mode.diff ? null : x;
        shape.attr("fill", p === null ? "#fff" : d3.interpolateGreys(0.1 + 0.6 * p));
        g.select(".node-text").classed("light", p !== null && p > 0.5);
      } else {
        shape.attr("fill", x === null ? "#fff" : colour(x));
        g.select(".node-text").classed("light", x !== null && Math.abs(x) / m > 0.4);
      }
    });
    // a feature page of the variant on show (diff: the adapted side)
    drawn.nodes.filter((n) => n.kind === "feature").attr("href", (n) => featureHref(n, mode.variant));
    const ev = [];
    drawn.edges.each((e) => {
      const x = edgeValue(e, state);
      if (x !== null) ev.push(Math.abs(x));
    });
    const em = d3.max(ev) || 1;
    drawn.edges
      .classed("hidden", (e) => edgeValue(e, state) === null)
      .attr("stroke", (e) => {
        const x = edgeValue(e, state);
        return x === null ? "none" : x >= 0 ? "#c62828" : "#2f5fd0";
      })
      .attr("stroke-width", (e) => {
        const x = edgeValue(e, state);
        return x === null ? 0 : 0.4 + 5 * Math.sqrt(Math.abs(x) / em);
      })
      .attr("stroke-opacity", (e) => {
        const x = edgeValue(e, state);
        return x === null ? 0 : 0.15 + 0.6 * Math.sqrt(Math.abs(x) / em);
      });
  }

  // ------------------------------------------------------------------ side panel

  function showInfo(data, n, mode) {
    infoEl.replaceChildren();
    const h = el("h3", null, n.label);
    infoEl.appendChild(h);
    const where = [];
    if (n.layer !== null) where.push("layer " + n.layer);
    if (n.pos !== null) where.push("position " + n.pos + " " + shownToken(n.token));
    if (n.kind === "logit") where.push("logit " + shownToken(n.token) + (n.verdict ? " (" + n.verdict + ")" : " (unlabelled)"));
    infoEl.appendChild(el("p", "muted", n.kind + (where.length ? " · " + where.join(" · ") : "")));
    const table = el("table", "info");
    const head = el("tr");
    ["", n.kind === "logit" ? "probability" : "score", "activation"].forEach((t) => head.appendChild(el("th", null, t)));
    table.appendChild(head);
    data.variants.forEach((v) => {
      const row = el("tr");
      const val = n.values[v];
      row.appendChild(el("td", null, v));
      row.appendChild(el("td", "num", val ? fmt(n.kind === "logit" ? val.probability : val.score) : "absent"));
      row.appendChild(el("td", "num", val && val.activation !== null ? d3.format(".3~g")(val.activation) : "–"));
      table.appendChild(row);
    });
    data.diffs.forEach((v) => {
      const row = el("tr");
      row.appendChild(el("td", null, v + " \u2212 " + data.reference));
      row.appendChild(el("td", "num", n.diff[v] === undefined ? "one graph only" : fmt(n.diff[v])));
      row.appendChild(el("td", null, ""));
      table.appendChild(row);
    });
    infoEl.appendChild(table);
    if (n.kind === "feature") {
      const variant = mode ? mode.variant : data.reference;
      const a = el("a", null, "open the feature page");
      a.href = featureHref(n, variant);
      infoEl.appendChild(el("p")).appendChild(a);
    }
  }
})();
