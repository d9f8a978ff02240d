// comfyui-lycoris front end: shows what an adapter is on the loader and stack nodes.
// On adapter change it asks GET /lycoris/info?name=... and shows algorithm, rank,
// base model, trigger words (each with a copy button) and the preview image.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPES = new Set(["LycorisLoader", "LycorisLoaderModelOnly", "LycorisStack"]);
const ADAPTER_WIDGET = /^adapter_name(_\d+)?$/;
const infoCache = new Map();

const STYLE = `
.lycoris-info { font: 11px sans-serif; color: var(--input-text, #ddd); padding: 4px 6px;
  overflow-y: auto; box-sizing: border-box; background: var(--comfy-input-bg, #222); border-radius: 6px; }
.lycoris-info .row { margin: 1px 0; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.lycoris-info .k { opacity: .65; margin-right: 4px; }
.lycoris-info .err { color: #f77; white-space: normal; }
.lycoris-info .words { display: flex; flex-wrap: wrap; gap: 3px; margin: 3px 0; }
.lycoris-info button { font: 10px sans-serif; padding: 0 4px; cursor: pointer; border-radius: 4px;
  border: 1px solid var(--border-color, #555); background: var(--comfy-menu-bg, #333); color: inherit; }
.lycoris-info img { max-width: 100%; max-height: 160px; display: block; margin-top: 4px; border-radius: 4px; }
.lycoris-info .match { white-space: pre-wrap; opacity: .8; margin-top: 3px; }
`;

function addStyle() {
  if (document.getElementById("lycoris-info-style")) return;
  const style = document.createElement("style");
  style.id = "lycoris-info-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return;
  } catch (e) {
    // clipboard API unavailable (insecure context): fall back to a hidden textarea
  }
  const area = document.createElement("textarea");
  area.value = text;
  document.body.appendChild(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

async function fetchInfo(name) {
  if (infoCache.has(name)) return infoCache.get(name);
  const resp = await api.fetchApi(`/lycoris/info?name=${encodeURIComponent(name)}`);
  const body = await resp.json().catch(() => ({ error: `HTTP ${resp.status}` }));
  const info = resp.ok ? body : { error: body.error || `HTTP ${resp.status}` };
  if (resp.ok) infoCache.set(name, info);
  return info;
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function row(label, value) {
  const div = el("div", "row");
  div.append(el("span", "k", label), el("span", "", value));
  div.title = `${label} ${value}`;
  return div;
}

function counts(obj) {
  const parts = Object.entries(obj || {}).map(([k, v]) => `${k} ×${v}`);
  return parts.length ? parts.join(", ") : "–";
}

function copyButton(label, text) {
  const button = el("button", "", label);
  button.title = `Copy "${text}"`;
  button.onclick = async (ev) => {
    ev.stopPropagation();
    await copyText(text);
    button.textContent = "✓";
    setTimeout(() => (button.textContent = label), 800);
  };
  return button;
}

// the same phrase as lycoris_core.adapter.describe.architecture_text
function architectureText(info) {
  const variants = info.variants || [];
  if (!info.family || (info.family === info.architecture && !variants.length)) return info.architecture;
  if (info.variant) return `${info.family}, variant ${info.variant}`;
  if (variants.length) return `${info.family} (fits ${variants.join(", ")})`;
  return info.family;
}

function render(panel, name, info, widgetName) {
  panel.replaceChildren();
  if (!name || name === "None") {
    panel.append(el("div", "row k", "no adapter selected"));
    return;
  }
  const head = widgetName && widgetName !== "adapter_name" ? `${widgetName}: ${name}` : name;
  panel.append(el("div", "row", head));
  if (info.error) {
    panel.append(el("div", "err", info.error));
    return;
  }
  panel.append(
    row("algorithm", counts(info.algorithms)),
    row("rank", counts(info.ranks)),
    row("alpha", counts(info.alpha)),
    row("base model", info.base_model || "not stated"),
    row("architecture", architectureText(info)),
  );
  const words = info.trigger_words || [];
  const wordBox = el("div", "words");
  if (words.length) {
    wordBox.append(el("span", "k", "trigger words"));
    for (const word of words.slice(0, 12)) wordBox.append(copyButton(word, word));
    wordBox.append(copyButton("copy all", words.join(", ")));
  } else {
    wordBox.append(el("span", "k", "no trigger words in metadata"));
  }
  panel.append(wordBox);
  if (info.preview_url) {
    const img = el("img");
    img.src = api.apiURL(info.preview_url);
    img.alt = `preview of ${name}`;
    panel.append(img);
  }
}

function setupNode(node) {
  addStyle();
  const panel = el("div", "lycoris-info");
  const widget = node.addDOMWidget?.("lycoris_info", "lycoris_info", panel, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => 90,
  });
  if (widget) widget.serialize = false;
  const match = el("div", "match");

  let token = 0;
  const show = async (w) => {
    const mine = ++token;
    const name = w?.value;
    if (!name || name === "None") {
      render(panel, name, {}, w?.name);
      return;
    }
    panel.replaceChildren(el("div", "row k", `reading ${name}…`));
    let info;
    try {
      info = await fetchInfo(name);
    } catch (e) {
      info = { error: String(e) };
    }
    if (mine === token) {
      render(panel, name, info, w.name);
      panel.append(match);
    }
  };

  const adapterWidgets = (node.widgets || []).filter((w) => ADAPTER_WIDGET.test(w.name));
  for (const w of adapterWidgets) {
    const original = w.callback;
    w.callback = function (...args) {
      const result = original?.apply(this, args);
      show(w);
      return result;
    };
  }
  const first = () => adapterWidgets.find((w) => w.value && w.value !== "None") || adapterWidgets[0];
  // widget values arrive after creation when a workflow is loaded
  setTimeout(() => show(first()), 0);
  node.lycorisShow = () => show(first());

  const onExecuted = node.onExecuted;
  node.onExecuted = function (output) {
    onExecuted?.apply(this, arguments);
    const text = output?.lycoris?.[0];
    if (text) {
      match.textContent = text;
      if (!match.isConnected) panel.append(match);
    }
  };
}

app.registerExtension({
  name: "comfyui-lycoris.info",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      try {
        setupNode(this);
      } catch (e) {
        console.warn("[comfyui-lycoris] info panel unavailable:", e);
      }
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      this.lycorisShow?.();
      return result;
    };
  },
});
