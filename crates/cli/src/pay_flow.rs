//! What a debtor's browser does on the page to pay now, without a browser: the pay-now form,
//! the provider's page (the dev stand-ins' "approve"/"cancel"), and back to the portal. The
//! demo pays this way, and the end-to-end tests drive the portal with it.

/// The first pay-now form of a page: its invoice and anti-forgery token.
pub fn pay_form(html: &str) -> Option<(String, String)> {
    let (_, form) = html.split_once("class=\"pay-now\"")?;
    let form = form.split("</form>").next()?;
    let field = |name: &str| {
        let (_, rest) = form.split_once(&format!("name=\"{name}\" value=\""))?;
        rest.split_once('"').map(|(v, _)| v.to_owned())
    };
    Some((field("invoice")?, field("form_token")?))
}

/// A client that, like a test's view of a browser, shows each redirect instead of following it.
pub fn no_redirects() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// Where an answer redirects to.
pub fn location(r: &reqwest::Response) -> String {
    r.headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Posts the page's first pay-now form (`page_url` the page's full URL, `page` its HTML) for
/// `provider` with `amount` (empty: all of it); where the portal sends the browser.
pub async fn checkout(
    browser: &reqwest::Client,
    page_url: &str,
    page: &str,
    amount: &str,
    provider: &str,
) -> anyhow::Result<String> {
    let (invoice, form_token) = pay_form(page).ok_or_else(|| anyhow::anyhow!("no pay-now form on the page"))?;
    let lang = page
        .split_once("<html lang=\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map_or("en", |(lang, _)| lang);
    let started = browser
        .post(format!("{page_url}/checkout"))
        .form(&[
            ("invoice", invoice.as_str()),
            ("form_token", form_token.as_str()),
            ("lang", lang),
            ("amount", amount),
            ("provider", provider),
        ])
        .send()
        .await?;
    anyhow::ensure!(
        started.status().as_u16() == 303,
        "checkout answered {}",
        started.status()
    );
    Ok(location(&started))
}

/// What came of paying on the page through the Vipps MobilePay stand-in.
pub struct Paid {
    /// The reference the provider knows the payment by.
    pub reference: String,
    /// The portal's return page: its status and body.
    pub status: u16,
    pub body: String,
}

/// Pays from the page with Vipps MobilePay: the form, the app's choice (`approve` or
/// `cancel`, on the stand-in's landing page), and the page the debtor comes back to.
pub async fn pay_with_vipps(page_url: &str, page: &str, amount: &str, choice: &str) -> anyhow::Result<Paid> {
    let browser = no_redirects()?;
    let landing = checkout(&browser, page_url, page, amount, "vipps").await?;
    let reference = landing.rsplit('/').next().unwrap_or_default().to_owned();
    let chosen = browser.post(format!("{landing}/{choice}")).send().await?;
    anyhow::ensure!(chosen.status().as_u16() == 303, "the app answered {}", chosen.status());
    let back = browser.get(location(&chosen)).send().await?;
    let status = back.status().as_u16();
    Ok(Paid {
        reference,
        status,
        body: back.text().await?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_pay_now_form_is_read_from_the_page() {
        let html = r#"<form class="other"><input name="invoice" value="x"></form>
            <form method="post" action="t/checkout" class="pay-now">
            <input type="hidden" name="invoice" value="i1">
            <input type="hidden" name="form_token" value="abc_-1">
            </form>"#;
        assert_eq!(pay_form(html), Some(("i1".into(), "abc_-1".into())));
        assert_eq!(pay_form("<p>paid</p>"), None);
    }
}
