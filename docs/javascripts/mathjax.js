// MathJax configuration for pymdownx.arithmatex (generic mode). MathJax itself
// (javascripts/mathjax/tex-svg.js) is part of the site: docs/hooks/offline_mathjax.py.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  svg: { fontCache: "global" },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};

// Material's instant navigation swaps pages without reloading scripts: typeset again.
// The guard keeps a page readable (raw TeX, no TypeError) if MathJax failed to load.
document$.subscribe(() => {
  if (!window.MathJax || !MathJax.startup || !MathJax.typesetPromise) return;
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
