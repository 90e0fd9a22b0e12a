// Navigation without a reload, for pages that move on by themselves (after a submit).
// app.js registers its render function here, so pages need not import app.js.

let renderPage = () => location.reload();

export function setRenderer(fn) {
  renderPage = fn;
}

export function navigate(url) {
  history.pushState(null, "", url);
  renderPage();
}
