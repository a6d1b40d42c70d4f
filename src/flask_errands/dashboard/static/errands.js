// flask-errands dashboard: live progress, live workers and the overview charts.
// Data arrives only from the JSON API and data- attributes, and is written with
// textContent and setAttribute, never as HTML, so no value can become markup.
"use strict";

(function () {
  const STATUSES = ["pending", "blocked", "queued", "scheduled", "running", "succeeded", "failed",
                    "cancelled"];
  const FINISHED = ["succeeded", "failed", "cancelled"];
  const SVG = "http://www.w3.org/2000/svg";

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (!response.ok) throw new Error(url + ": " + response.status);
        return response.json();
      });
  }

  function pad(n) { return String(n).padStart(2, "0"); }

  function formatTime(iso) {
    if (!iso) return "\u2014";
    const d = new Date(iso);
    if (isNaN(d.getTime())) return "\u2014";
    return d.getUTCFullYear() + "-" + pad(d.getUTCMonth() + 1) + "-" + pad(d.getUTCDate()) +
      " " + pad(d.getUTCHours()) + ":" + pad(d.getUTCMinutes()) + ":" + pad(d.getUTCSeconds()) + " UTC";
  }

  function setText(root, field, text) {
    root.querySelectorAll('[data-field="' + field + '"]').forEach(function (el) {
      el.textContent = text;
    });
  }

  function pretty(value) {
    return JSON.stringify(value, null, 2);
  }

  // -- live jobs ------------------------------------------------------------

  function showJob(root, job) {
    const status = STATUSES.indexOf(job.status) >= 0 ? job.status : "unknown";
    root.querySelectorAll('[data-field="status"]').forEach(function (el) {
      el.textContent = status;
      el.setAttribute("class", "status status-" + status);
    });
    const p = typeof job.progress === "number" ? job.progress : null;
    root.querySelectorAll('[data-field="progress"]').forEach(function (el) {
      el.value = p === null ? 0 : p;
      el.hidden = p === null;
    });
    setText(root, "progress_text", p === null ? "" : Math.round(p * 100) + "%");
    setText(root, "progress_message", job.progress_message || "");
    setText(root, "attempts", job.attempts + "/" + job.max_attempts);
    setText(root, "started_at", formatTime(job.started_at));
    setText(root, "finished_at", formatTime(job.finished_at));
    if ("worker_id" in job) setText(root, "worker_id", job.worker_id || "\u2014");
    if ("traceback" in job) {
      setText(root, "error", job.error || "");
      setText(root, "traceback", job.traceback || "");
    }
    if ("result" in job) setText(root, "result", pretty(job.result));
    const finished = FINISHED.indexOf(status) >= 0;
    const shown = { finished: finished, live: !finished, succeeded: status === "succeeded",
                    error: Boolean(job.error) };
    root.querySelectorAll("[data-show-when]").forEach(function (el) {
      el.hidden = !shown[el.getAttribute("data-show-when")];
    });
    return finished;
  }

  // A job page polls every second; each live row of a listing every two.
  function watchJob(root) {
    const url = root.getAttribute("data-api");
    const base = root.tagName === "TR" ? 2000 : 1000;
    let delay = base;
    function poll() {
      getJSON(url).then(function (job) {
        delay = base;
        if (!showJob(root, job)) setTimeout(poll, delay);
      }).catch(function () {
        delay = Math.min(delay * 2, 30000);
        setTimeout(poll, delay);
      });
    }
    setTimeout(poll, delay);
  }

  // -- overview -------------------------------------------------------------

  function svgEl(name, attrs, parent) {
    const el = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (key) { el.setAttribute(key, String(attrs[key])); });
    if (parent) parent.appendChild(el);
    return el;
  }

  function label(parent, x, y, text, anchor) {
    const t = svgEl("text", { x: x, y: y, "text-anchor": anchor || "start", class: "axis" }, parent);
    t.textContent = text;
  }

  function hhmm(iso) {
    const d = new Date(iso);
    return isNaN(d.getTime()) ? "" : pad(d.getUTCHours()) + ":" + pad(d.getUTCMinutes());
  }

  // One chart: stacked bars or lines of several series over the minutes, with a y scale.
  function drawChart(box, minutes, series, kind) {
    const W = 600, H = 170, L = 34, R = 6, T = 8, B = 20;
    const n = minutes.length;
    const plotW = W - L - R, plotH = H - T - B;
    let top = 2;
    for (let i = 0; i < n; i++) {
      let sum = 0;
      series.forEach(function (s) {
        const v = Number(s.values[i]) || 0;
        sum = kind === "bars" ? sum + v : Math.max(sum, v);
      });
      top = Math.max(top, sum);
    }
    if (top % 2) top += 1;  // the middle gridline then has a whole number
    const svg = svgEl("svg", { viewBox: "0 0 " + W + " " + H, class: "chart-svg",
                               preserveAspectRatio: "none" });
    [0, 0.5, 1].forEach(function (f) {
      const y = T + plotH * (1 - f);
      svgEl("line", { x1: L, x2: W - R, y1: y, y2: y, class: "grid" }, svg);
      label(svg, L - 4, y + 4, String(Math.round(top * f)), "end");
    });
    if (n > 0) {
      label(svg, L, H - 4, hhmm(minutes[0]), "start");
      label(svg, W - R, H - 4, hhmm(minutes[n - 1]), "end");
    }
    const step = plotW / Math.max(n, 1);
    const scale = function (v) { return plotH * v / top; };
    if (kind === "bars") {
      for (let i = 0; i < n; i++) {
        let base = 0;
        series.forEach(function (s) {
          const v = Number(s.values[i]) || 0;
          if (v <= 0) return;
          const h = scale(v);
          const rect = svgEl("rect", { x: L + i * step + 0.5, y: T + plotH - scale(base) - h,
                                       width: Math.max(step - 1, 1), height: h,
                                       class: "series-" + s.name }, svg);
          svgEl("title", {}, rect).textContent = hhmm(minutes[i]) + " " + s.name + ": " + v;
          base += v;
        });
      }
    } else {
      // A minute nobody sampled is null: the line breaks there instead of dropping to 0.
      series.forEach(function (s) {
        let points = [];
        const flush = function () {
          if (points.length === 1) {
            const xy = points[0].split(",");
            svgEl("circle", { cx: xy[0], cy: xy[1], r: 2.5, class: "dot series-" + s.name }, svg);
          } else if (points.length > 1) {
            svgEl("polyline", { points: points.join(" "), class: "line series-" + s.name }, svg);
          }
          points = [];
        };
        for (let i = 0; i < n; i++) {
          const raw = s.values[i];
          if (raw === null || raw === undefined || !isFinite(Number(raw))) { flush(); continue; }
          const x = (L + i * step + step / 2).toFixed(1);
          points.push(x + "," + (T + plotH - scale(Number(raw))).toFixed(1));
        }
        flush();
      });
    }
    box.replaceChildren(svg);
  }

  function drawStats(section) {
    getJSON(section.getAttribute("data-stats")).then(function (stats) {
      const minutes = Array.isArray(stats.minutes) ? stats.minutes : [];
      const pick = function (name) {
        return { name: name, values: Array.isArray(stats[name]) ? stats[name] : [] };
      };
      section.querySelectorAll("[data-chart]").forEach(function (box) {
        if (box.getAttribute("data-chart") === "throughput") {
          drawChart(box, minutes, [pick("succeeded"), pick("failed")], "bars");
        } else {
          drawChart(box, minutes, [pick("queued"), pick("scheduled"), pick("running")], "lines");
        }
      });
    }).catch(function () { /* keep the last drawing; the next poll tries again */ });
  }

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
  }

  function drawWorkers(table) {
    getJSON(table.getAttribute("data-workers")).then(function (data) {
      const body = table.tBodies[0];
      const rows = (data.workers || []).map(function (w) {
        const tr = document.createElement("tr");
        cell(tr, String(w.id), "mono");
        cell(tr, String(w.host || ""));
        cell(tr, w.pid === null || w.pid === undefined ? "\u2014" : String(w.pid));
        cell(tr, (w.queues || ["all"]).join(", "));
        cell(tr, String((w.current_jobs || []).length), "num");
        cell(tr, String(w.jobs_done || 0), "num");
        return tr;
      });
      if (rows.length === 0) {
        const tr = document.createElement("tr");
        cell(tr, "No live worker.", "empty");
        tr.firstChild.colSpan = 6;
        rows.push(tr);
      }
      body.replaceChildren.apply(body, rows);
      document.querySelectorAll("[data-workers-count]").forEach(function (el) {
        el.textContent = String((data.workers || []).length);
      });
    }).catch(function () { /* try again at the next poll */ });
  }

  function every(ms, fn) {
    fn();
    setInterval(function () { if (!document.hidden) fn(); }, ms);
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live-job]").forEach(function (root) {
      if (root.getAttribute("data-live-job") !== "finished") watchJob(root);
    });
    document.querySelectorAll("[data-stats]").forEach(function (section) {
      every(10000, function () { drawStats(section); });
    });
    document.querySelectorAll("[data-workers]").forEach(function (table) {
      setInterval(function () { if (!document.hidden) drawWorkers(table); }, 5000);
    });
  });
})();
