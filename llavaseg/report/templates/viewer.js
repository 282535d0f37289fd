// The sample viewer (llavaseg.report.viewer): filters, sorts and pages the index in the browser; a page loads only the
// text chunks and images of the samples it shows. Every text goes in through textContent.
"use strict";
(function () {
  const PAGE_SIZE = 24;
  const FIELDS = [
    ["sample_id", "sample"], ["spec", "split"], ["family", "dataset family"], ["query_kind", "query kind"],
    ["query", "query"], ["reason_answer", "step-1 answer"], ["target", "target"], ["attributes", "attributes"],
    ["reference_answer", "reference answer"], ["iou", "IoU"], ["status", "status"], ["error", "error"],
    ["parse_status", "parse status"],
  ];
  const chunks = {};
  const waiting = {};
  let index = null;
  let selected = [];
  let page = 0;
  const $ = (id) => document.getElementById(id);

  window.llavasegChunk = function (number, rows) {
    chunks[number] = rows;
  };

  function chunk(number) {
    if (chunks[number]) return Promise.resolve(chunks[number]);
    if (!waiting[number]) {
      waiting[number] = new Promise((resolve, reject) => {
        const script = document.createElement("script");
        script.src = "data/chunk-" + String(number).padStart(5, "0") + ".js";
        script.onload = () => resolve(chunks[number]);
        script.onerror = () => reject(new Error("cannot load " + script.src));
        document.head.appendChild(script);
      });
    }
    return waiting[number];
  }

  function sample(n) {
    return chunk(Math.floor(n / index.chunk_size)).then((rows) => rows[n % index.chunk_size]);
  }

  function iouText(iou) {
    return iou === null || iou === undefined ? "IoU –" : "IoU " + (100 * iou).toFixed(1) + "%";
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function fillSelect(id, values) {
    const select = $(id);
    for (const value of values) select.appendChild(element("option", "", value)).value = value;
  }

  function readFilters() {
    const number = (id, fallback) => {
      const value = parseFloat($(id).value);
      return Number.isFinite(value) ? value : fallback;
    };
    return {
      spec: $("f-spec").value, kind: $("f-kind").value, status: $("f-status").value,
      min: number("f-min", 0), max: number("f-max", 1), sort: $("f-sort").value,
    };
  }

  function applyFilters() {
    const f = readFilters();
    const spec = f.spec ? index.specs.indexOf(f.spec) : -1;
    const kind = f.kind ? index.kinds.indexOf(f.kind) : -1;
    const status = f.status ? index.statuses.indexOf(f.status) : -1;
    const fullRange = f.min <= 0 && f.max >= 1;
    selected = [];
    index.rows.forEach((row, n) => {
      if (spec >= 0 && row[0] !== spec) return;
      if (kind >= 0 && row[1] !== kind) return;
      if (status >= 0 && row[2] !== status) return;
      const iou = row[3];
      if (!fullRange && (iou === null || iou < f.min || iou > f.max)) return;
      selected.push(n);
    });
    if (f.sort !== "order") {
      const sign = f.sort === "iou-asc" ? 1 : -1;
      selected.sort((a, b) => {
        const x = index.rows[a][3], y = index.rows[b][3];
        if (x === null || y === null) return (x === null) - (y === null) || a - b;
        return sign * (x - y) || a - b;
      });
    }
    page = 0;
    render();
  }

  function card(n) {
    const row = index.rows[n];
    const button = element("button", "card");
    button.type = "button";
    button.dataset.n = String(n);
    const text = element("div", "text");
    const head = element("div");
    head.appendChild(element("span", "iou", iouText(row[3])));
    const status = index.statuses[row[2]];
    head.appendChild(element("span", status === "ok" ? "status" : "status bad", status));
    text.appendChild(head);
    const id = element("div", "id", "…");
    const query = element("div", "query", "");
    text.appendChild(id);
    text.appendChild(query);
    const picture = element("div", "noimg", "loading…");
    button.appendChild(picture);
    button.appendChild(text);
    button.addEventListener("click", () => openDetail(n));
    sample(n).then((s) => {
      button.dataset.sampleId = s.sample_id;
      id.textContent = s.sample_id;
      query.textContent = s.query || "";
      if (s.image) {
        const img = element("img");
        img.loading = "lazy";
        img.alt = s.sample_id;
        img.src = s.image;
        button.replaceChild(img, picture);
      } else {
        picture.textContent = s.image_error || "no picture";
      }
    }, (error) => { id.textContent = String(error); });
    return button;
  }

  function render() {
    const pages = Math.max(1, Math.ceil(selected.length / PAGE_SIZE));
    page = Math.min(Math.max(page, 0), pages - 1);
    const start = page * PAGE_SIZE;
    const shown = selected.slice(start, start + PAGE_SIZE);
    const grid = $("grid");
    grid.replaceChildren(...shown.map(card));
    $("summary").textContent = selected.length
      ? `${selected.length.toLocaleString("en")} of ${index.count.toLocaleString("en")} samples match; ` +
        `showing ${start + 1}–${start + shown.length}`
      : `no sample of ${index.count.toLocaleString("en")} matches these filters`;
    $("page-label").textContent = `page ${page + 1} of ${pages}`;
    $("prev").disabled = page === 0;
    $("next").disabled = page >= pages - 1;
  }

  function openDetail(n) {
    sample(n).then((s) => {
      $("d-title").textContent = s.sample_id;
      const img = $("d-image");
      img.hidden = !s.image;
      if (s.image) img.src = s.image; else img.removeAttribute("src");
      $("d-noimage").textContent = s.image_error || (s.image ? "" : "no picture");
      const fields = $("d-fields");
      fields.replaceChildren();
      for (const [key, label] of FIELDS) {
        const value = key === "iou" ? iouText(s.iou).replace("IoU ", "") : s[key];
        if (value === null || value === undefined || value === "") continue;
        fields.appendChild(element("dt", "", label));
        const dd = element("dd", "", value);
        dd.dataset.field = key;
        fields.appendChild(dd);
      }
      $("detail").classList.add("open");
      $("detail").dataset.n = String(n);
      $("d-close").focus();
    });
  }

  function closeDetail() {
    $("detail").classList.remove("open");
  }

  window.llavasegIndex = function (data) {
    index = data;
    fillSelect("f-spec", index.specs);
    fillSelect("f-kind", index.kinds);
    fillSelect("f-status", index.statuses);
    for (const id of ["f-spec", "f-kind", "f-status", "f-min", "f-max", "f-sort"]) {
      $(id).addEventListener("change", applyFilters);
    }
    $("prev").addEventListener("click", () => { page -= 1; render(); window.scrollTo(0, 0); });
    $("next").addEventListener("click", () => { page += 1; render(); window.scrollTo(0, 0); });
    $("d-close").addEventListener("click", closeDetail);
    $("detail").addEventListener("click", (event) => { if (event.target === $("detail")) closeDetail(); });
    document.addEventListener("keydown", (event) => { if (event.key === "Escape") closeDetail(); });
    applyFilters();
  };
})();
