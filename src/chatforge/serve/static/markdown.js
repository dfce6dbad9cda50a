// A small Markdown renderer for model output. Safety first: every piece of source text is
// HTML-escaped before any tag is added, links are kept only for http(s) and mailto URLs, and
// nothing is ever evaluated. Supports what chat answers use: paragraphs, headings, fenced code
// blocks (an unclosed fence, as in a half-streamed answer, renders as code so far), inline code,
// bold, italic, links, bullet and numbered lists, block quotes and horizontal rules.

export function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

const LINK = /\[([^\]\n]+)\]\(((?:https?:\/\/|mailto:)[^\s)]+)\)/g;

function emphasis(html) {
  // `html` is escaped text with no tags in it yet.
  html = html.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
  html = html.replace(/(^|[^\w*])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>");
  return html.replace(/(^|[^\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>");
}

function inlineText(s) {
  // `s` has no code spans. Links first, then emphasis only in the text between and inside them:
  // emphasis applied after the <a> tags were written rewrote their href ([a_](http://x/_y_)).
  let out = "";
  let last = 0;
  for (const m of s.matchAll(LINK)) {
    out += emphasis(escapeHtml(s.slice(last, m.index)));
    out += `<a href="${escapeHtml(m[2])}" target="_blank" rel="noopener noreferrer nofollow">${emphasis(escapeHtml(m[1]))}</a>`;
    last = m.index + m[0].length;
  }
  return out + emphasis(escapeHtml(s.slice(last)));
}

export function renderInline(s) {
  const parts = s.split(/(`[^`\n]+`)/);
  return parts.map((p) => (p.length > 1 && p.startsWith("`") && p.endsWith("`")
    ? `<code>${escapeHtml(p.slice(1, -1))}</code>` : inlineText(p))).join("");
}

export function renderMarkdown(src) {
  const lines = String(src).replace(/\r\n?/g, "\n").split("\n");
  const html = [];
  let para = [];
  let list = null; // {tag, items}
  let quote = [];

  const flushPara = () => {
    if (para.length) html.push(`<p>${para.map(renderInline).join("<br>")}</p>`);
    para = [];
  };
  const flushList = () => {
    const start = list && list.start !== 1 ? ` start="${list.start}"` : "";
    if (list) html.push(`<${list.tag}${start}>${list.items.map((t) => `<li>${renderInline(t)}</li>`).join("")}</${list.tag}>`);
    list = null;
  };
  const itemRe = /^\s*(?:([-*+])|(\d+)[.)])\s+(.*)$/;
  const flushQuote = () => {
    if (quote.length) html.push(`<blockquote>${quote.map(renderInline).join("<br>")}</blockquote>`);
    quote = [];
  };
  const flushAll = () => { flushPara(); flushList(); flushQuote(); };

  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*(```+|~~~+)\s*([\w+#.-]*)\s*$/);
    if (fence) {
      flushAll();
      const code = [];
      let j = i + 1;
      while (j < lines.length && !lines[j].trim().startsWith(fence[1])) code.push(lines[j++]);
      const lang = fence[2] ? ` data-lang="${escapeHtml(fence[2])}"` : "";
      html.push(`<pre class="code"${lang}><code>${escapeHtml(code.join("\n"))}</code></pre>`);
      i = j; // the closing fence (or past the end)
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      flushAll();
      const n = heading[1].length;
      html.push(`<h${n}>${renderInline(heading[2])}</h${n}>`);
      continue;
    }
    if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flushAll();
      html.push("<hr>");
      continue;
    }
    const item = line.match(itemRe);
    if (item) {
      flushPara(); flushQuote();
      const tag = item[1] ? "ul" : "ol";
      if (!list || list.tag !== tag) { flushList(); list = { tag, items: [], start: item[2] ? Number(item[2]) : 1 }; }
      list.items.push(item[3]);
      continue;
    }
    const q = line.match(/^>\s?(.*)$/);
    if (q) {
      flushPara(); flushList();
      quote.push(q[1]);
      continue;
    }
    if (!line.trim()) {
      // A blank line between items of one list ("1. ...", "", "2. ...") keeps the list going.
      const nextLine = lines.slice(i + 1).find((l) => l.trim());
      const nextItem = nextLine && nextLine.match(itemRe);
      if (list && nextItem && (nextItem[1] ? "ul" : "ol") === list.tag) { flushPara(); flushQuote(); continue; }
      flushAll();
      continue;
    }
    flushList(); flushQuote();
    para.push(line);
  }
  flushAll();
  return html.join("\n");
}
