// How docs/img/report_*.png were taken: Snakemake's report in headless Chromium (Debian's
// chromium package) driven by playwright-core from npm, outside the project:
//   snakemake --configfile config/demo.yaml --report /tmp/report.html
//   (cd /tmp/pw && npm install playwright-core && node /path/to/screenshot.js)
// It opens each report category, clicks the item's view icon and saves a screenshot.
const { chromium } = require('playwright-core');
(async () => {
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox','--disable-gpu','--disable-quic','--no-first-run','--disable-background-networking','--disable-component-update','--disable-sync'] });
  const page = await browser.newPage({ viewport: { width: 1500, height: 950 } });
  await page.goto('file:///tmp/report.html');
  await page.waitForTimeout(1500);
  const views = [['Logit check', 'logit_check.png', '/tmp/shot_logit.png'], ['Report', 'all checkpoints', '/tmp/shot_table.png'], ['Report', 'files that need', '/tmp/shot_attention.png'], ['Overview', 'status_by_lang_pair.png', '/tmp/shot_status.png']];
  for (const [cat, file, out] of views) {
    await page.locator('svg').first(); 
    // back to the results list
    await page.goto('file:///tmp/report.html'); await page.waitForTimeout(1200);
    await page.getByText(cat, { exact: true }).last().click();
    await page.waitForTimeout(600);
    const row = page.locator(`text=${file}`).first().locator('xpath=..');
    const icons = row.locator('svg, a, button');
    console.log(cat, 'icons', await icons.count());
    await icons.first().click();
    await page.waitForTimeout(1500);
    await page.screenshot({ path: out });
  }
  await browser.close();
})();
