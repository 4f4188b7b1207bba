//! Invoice PDF rendering.
//!
//! [`render`] lays an [`Invoice`] out on A4 pages with `pdf-writer`, using the standard
//! Helvetica fonts (base-14, not embedded) in `WinAnsiEncoding`, so the files are small and
//! the text can be extracted. Characters that WinAnsi cannot show are printed as `?`.
//!
//! The layout is a simple top-down flow: a y cursor moves down the page and a new page starts
//! whenever the next block would cross the bottom margin. The output is deterministic — no
//! timestamps, no random file ids — so the same invoice always renders to the same bytes.
//!
//! Money is only formatted here (from exact [`Decimal`]s); the only floating-point arithmetic
//! is on layout coordinates.
//!
//! Length: one renderer for one document. Its blocks (header, parties, lines, totals, notes) share
//! the page cursor and the font metrics, so they stay together.

use pdf_writer::{Content, Name, Pdf, Rect, Ref, Str, TextStr};
use rust_decimal::{Decimal, RoundingStrategy};

use crate::billing::invoice::{Invoice, InvoiceLine, Party};

// Page geometry, in points (A4 with 50 pt margins).
const PAGE_WIDTH: f32 = 595.0;
const PAGE_HEIGHT: f32 = 842.0;
const LEFT: f32 = 50.0;
const RIGHT: f32 = 545.0;
const CONTENT_WIDTH: f32 = 495.0;
const BOTTOM: f32 = 50.0;
/// Baseline of the first line on a page: the top margin minus room for a 20 pt title.
const FIRST_BASELINE: f32 = 772.0;
/// Baseline of the page footer, inside the bottom margin.
const FOOTER_BASELINE: f32 = 30.0;

// Type sizes and line spacing.
const TITLE_SIZE: f32 = 20.0;
const NUMBER_SIZE: f32 = 12.0;
const BODY_SIZE: f32 = 10.0;
const NOTE_SIZE: f32 = 9.0;
const FOOTER_SIZE: f32 = 8.0;
const LEADING: f32 = 14.0;
const NOTE_LEADING: f32 = 12.0;
const GAP: f32 = 12.0;

// Two-column party blocks.
const BUYER_X: f32 = 310.0;
const PARTY_WIDTH: f32 = 235.0;

// Line table: the description is left-aligned, the numbers are right-aligned at these edges.
const DESCRIPTION_WIDTH: f32 = 230.0;
const QTY_RIGHT: f32 = 330.0;
const UNIT_PRICE_RIGHT: f32 = 440.0;
const AMOUNT_RIGHT: f32 = RIGHT;
/// Longer descriptions are cut and end with `...`.
const MAX_DESCRIPTION_LINES: usize = 3;

// Totals block.
const TOTALS_LABEL_X: f32 = 330.0;

// Fixed object ids; pages and their content streams are numbered from `FIRST_PAGE_ID` on.
const CATALOG_ID: Ref = Ref::new(1);
const PAGE_TREE_ID: Ref = Ref::new(2);
const INFO_ID: Ref = Ref::new(3);
const REGULAR_FONT_ID: Ref = Ref::new(4);
const BOLD_FONT_ID: Ref = Ref::new(5);
const FIRST_PAGE_ID: Ref = Ref::new(6);

const ELLIPSIS: &[u8] = b"...";

/// Renders the invoice as a one-or-more-page A4 PDF.
pub fn render(invoice: &Invoice) -> Vec<u8> {
    let mut layout = Layout::new();
    let summary = summary_rows(invoice);
    header(&mut layout, invoice);
    parties(&mut layout, invoice);
    // Reserve room for the totals below the last line, so they never sit alone on a page.
    line_table(&mut layout, invoice, summary.len() + TOTALS_EXTRA_ROWS);
    totals(&mut layout, invoice, &summary);
    notes(&mut layout, invoice);
    write_document(invoice, layout.finish(&invoice.number))
}

// ---------------------------------------------------------------------------------------------
// Invoice sections
// ---------------------------------------------------------------------------------------------

/// Title, invoice number, issue date and order id.
fn header(layout: &mut Layout, invoice: &Invoice) {
    layout.text(LEFT, Font::Bold, TITLE_SIZE, b"INVOICE");
    let number = encode_win_ansi(&invoice.number);
    layout.text_right(RIGHT, Font::Bold, NUMBER_SIZE, &number);
    layout.advance(TITLE_SIZE);
    layout.advance(GAP);

    let meta = [
        format!("Issue date: {}", issue_date(&invoice.issued_at)),
        format!("Order: {}", invoice.order_id),
    ];
    for line in &meta {
        layout.ensure_space(LEADING);
        layout.fitted_text(LEFT, Font::Regular, BODY_SIZE, line, CONTENT_WIDTH);
        layout.advance(LEADING);
    }
    layout.advance(GAP);
}

/// Seller on the left, buyer ("Bill to") on the right, drawn row by row so that a very long
/// address can still break across pages.
fn parties(layout: &mut Layout, invoice: &Invoice) {
    let mut seller = vec![(Font::Bold, "From".to_owned())];
    seller.extend(party_lines(&invoice.seller));
    let mut buyer = vec![(Font::Bold, "Bill to".to_owned())];
    buyer.extend(party_lines(&invoice.buyer));
    buyer.push((Font::Regular, format!("Account: {}", invoice.account_id)));

    for row in 0..seller.len().max(buyer.len()) {
        layout.ensure_space(LEADING);
        if let Some((font, text)) = seller.get(row) {
            layout.fitted_text(LEFT, *font, BODY_SIZE, text, PARTY_WIDTH);
        }
        if let Some((font, text)) = buyer.get(row) {
            layout.fitted_text(BUYER_X, *font, BODY_SIZE, text, PARTY_WIDTH);
        }
        layout.advance(LEADING);
    }
    layout.advance(GAP);
}

/// The printed lines of a party: name (bold), address, email and tax id; empty ones skipped.
fn party_lines(party: &Party) -> Vec<(Font, String)> {
    let mut lines = vec![(Font::Bold, party.name.clone())];
    lines.extend(
        party
            .address
            .iter()
            .map(|line| (Font::Regular, line.clone())),
    );
    if let Some(email) = &party.email {
        lines.push((Font::Regular, email.clone()));
    }
    if let Some(tax_id) = &party.tax_id {
        lines.push((Font::Regular, format!("Tax ID: {tax_id}")));
    }
    lines.retain(|(_, text)| !text.trim().is_empty());
    lines
}

/// The table of invoice lines; its header is repeated on every page it spans. The last line
/// only goes where `keep_rows` more rows fit below it.
fn line_table(layout: &mut Layout, invoice: &Invoice, keep_rows: usize) {
    layout.ensure_space(rows_height(2, LEADING));
    table_header(layout);
    for (index, line) in invoice.lines.iter().enumerate() {
        let description = wrap_limited(
            &encode_win_ansi(&line.description),
            Font::Regular,
            units_for_width(DESCRIPTION_WIDTH, BODY_SIZE),
            MAX_DESCRIPTION_LINES,
        );
        let is_last = index + 1 == invoice.lines.len();
        let rows = description.len() + if is_last { keep_rows } else { 0 };
        if layout.ensure_space(rows_height(rows, LEADING)) {
            table_header(layout);
        }
        table_row(layout, line, &description, &invoice.currency);
    }
    layout.rule();
    layout.advance(GAP);
}

fn table_header(layout: &mut Layout) {
    layout.text(LEFT, Font::Bold, BODY_SIZE, b"Description");
    layout.text_right(QTY_RIGHT, Font::Bold, BODY_SIZE, b"Qty");
    layout.text_right(UNIT_PRICE_RIGHT, Font::Bold, BODY_SIZE, b"Unit price");
    layout.text_right(AMOUNT_RIGHT, Font::Bold, BODY_SIZE, b"Amount");
    layout.advance(LEADING);
    layout.rule();
}

/// One invoice line: the numbers sit on the first line of the (possibly wrapped) description.
fn table_row(layout: &mut Layout, line: &InvoiceLine, description: &[Vec<u8>], currency: &str) {
    let quantity = line.quantity.to_string();
    let unit_price = encode_win_ansi(&format_money(line.unit_price, currency));
    let amount = encode_win_ansi(&format_money(line.amount, currency));
    layout.text_right(QTY_RIGHT, Font::Regular, BODY_SIZE, quantity.as_bytes());
    layout.text_right(UNIT_PRICE_RIGHT, Font::Regular, BODY_SIZE, &unit_price);
    layout.text_right(AMOUNT_RIGHT, Font::Regular, BODY_SIZE, &amount);
    for text in description {
        layout.text(LEFT, Font::Regular, BODY_SIZE, text);
        layout.advance(LEADING);
    }
}

/// Rows of the totals block besides the summary rows: the `Total` row, plus a row's worth of
/// room for the rules and gaps around the block.
const TOTALS_EXTRA_ROWS: usize = 3;

/// Subtotal, discount (if non-zero), total excluding tax and tax; `Total` is drawn apart.
fn summary_rows(invoice: &Invoice) -> Vec<(String, Decimal)> {
    let mut rows = vec![("Subtotal".to_owned(), invoice.subtotal)];
    if !invoice.discount.is_zero() {
        rows.push(("Discount".to_owned(), -invoice.discount));
    }
    rows.push((
        "Total excluding tax".to_owned(),
        invoice.total_excluding_tax,
    ));
    rows.push((
        format!("Tax ({}%)", invoice.tax_rate_percent.normalize()),
        invoice.tax,
    ));
    rows
}

/// The summary rows and the bold total, kept together on one page.
fn totals(layout: &mut Layout, invoice: &Invoice, rows: &[(String, Decimal)]) {
    let currency = &invoice.currency;
    layout.ensure_space(rows_height(rows.len() + 1, LEADING));
    for (label, amount) in rows {
        totals_row(
            layout,
            Font::Regular,
            label,
            &format_money(*amount, currency),
        );
    }
    layout.rule_from(TOTALS_LABEL_X);
    totals_row(
        layout,
        Font::Bold,
        "Total",
        &format_money(invoice.total, currency),
    );
    layout.advance(GAP);
}

fn totals_row(layout: &mut Layout, font: Font, label: &str, value: &str) {
    layout.text(TOTALS_LABEL_X, font, BODY_SIZE, &encode_win_ansi(label));
    layout.text_right(RIGHT, font, BODY_SIZE, &encode_win_ansi(value));
    layout.advance(LEADING);
}

/// Free-text notes, wrapped to the content width.
fn notes(layout: &mut Layout, invoice: &Invoice) {
    let max_units = units_for_width(CONTENT_WIDTH, NOTE_SIZE);
    for note in &invoice.notes {
        for line in wrap(&encode_win_ansi(note), Font::Regular, max_units) {
            layout.ensure_space(NOTE_LEADING);
            layout.text(LEFT, Font::Regular, NOTE_SIZE, &line);
            layout.advance(NOTE_LEADING);
        }
    }
}

/// The date part of an RFC 3339 timestamp (`2026-03-14T09:30:00Z` → `2026-03-14`).
fn issue_date(issued_at: &str) -> &str {
    issued_at
        .split_once('T')
        .map_or(issued_at, |(date, _)| date)
}

/// `9.99 USD`, `1200 JPY`: the currency's decimal places (half away from zero), then its code.
fn format_money(amount: Decimal, currency: &str) -> String {
    let places = super::money::exponent(currency);
    let mut rounded = amount.round_dp_with_strategy(places, RoundingStrategy::MidpointAwayFromZero);
    rounded.rescale(places);
    format!("{rounded} {currency}")
}

// ---------------------------------------------------------------------------------------------
// Page layout
// ---------------------------------------------------------------------------------------------

/// A y cursor over a growing list of pages. `y` is the baseline of the next line.
struct Layout {
    finished: Vec<Content>,
    current: Content,
    y: f32,
}

impl Layout {
    fn new() -> Self {
        Self {
            finished: Vec::new(),
            current: Content::new(),
            y: FIRST_BASELINE,
        }
    }

    /// Starts a new page unless `height` more points fit above the bottom margin. Returns
    /// whether a new page was started.
    #[expect(clippy::float_arithmetic, reason = "layout coordinates, not money")]
    fn ensure_space(&mut self, height: f32) -> bool {
        if self.y - height >= BOTTOM {
            return false;
        }
        let full = std::mem::replace(&mut self.current, Content::new());
        self.finished.push(full);
        self.y = FIRST_BASELINE;
        true
    }

    #[expect(clippy::float_arithmetic, reason = "layout coordinates, not money")]
    fn advance(&mut self, dy: f32) {
        self.y -= dy;
    }

    /// Shows already-encoded WinAnsi `text` with its left edge at `x`, on the current baseline.
    fn text(&mut self, x: f32, font: Font, size: f32, text: &[u8]) {
        show(&mut self.current, x, self.y, font, size, text);
    }

    /// Like [`Layout::text`], with the right edge at `right`.
    fn text_right(&mut self, right: f32, font: Font, size: f32, text: &[u8]) {
        let x = right_aligned_x(right, font, size, text);
        self.text(x, font, size, text);
    }

    /// Encodes `text` and shows it at `x`, cut with `...` if it is wider than `max_width`.
    fn fitted_text(&mut self, x: f32, font: Font, size: f32, text: &str, max_width: f32) {
        let fitted = truncate(
            &encode_win_ansi(text),
            font,
            units_for_width(max_width, size),
        );
        self.text(x, font, size, &fitted);
    }

    /// A thin grey line across the content width, just below the previous baseline.
    fn rule(&mut self) {
        self.rule_from(LEFT);
    }

    #[expect(clippy::float_arithmetic, reason = "layout coordinates, not money")]
    fn rule_from(&mut self, x: f32) {
        let y = self.y + LEADING - 4.0;
        self.current
            .save_state()
            .set_stroke_gray(0.6)
            .set_line_width(0.5)
            .move_to(x, y)
            .line_to(RIGHT, y)
            .stroke()
            .restore_state();
        self.advance(4.0);
    }

    /// All pages, each with a footer "<invoice number> - Page i of n".
    fn finish(mut self, number: &str) -> Vec<Content> {
        self.finished.push(self.current);
        let count = self.finished.len();
        for (index, page) in self.finished.iter_mut().enumerate() {
            let footer = format!("{number} - Page {} of {count}", index + 1);
            let footer = encode_win_ansi(&footer);
            let x = right_aligned_x(RIGHT, Font::Regular, FOOTER_SIZE, &footer);
            show(
                page,
                x,
                FOOTER_BASELINE,
                Font::Regular,
                FOOTER_SIZE,
                &footer,
            );
        }
        self.finished
    }
}

/// One `BT … Tj ET` text object; every piece of text is its own object, which keeps the
/// text easy to extract line by line.
fn show(content: &mut Content, x: f32, y: f32, font: Font, size: f32, text: &[u8]) {
    content
        .begin_text()
        .set_font(font.resource_name(), size)
        .next_line(x, y)
        .show(Str(text))
        .end_text();
}

/// Height taken by `rows` lines of the given leading.
#[expect(clippy::float_arithmetic, reason = "layout coordinates, not money")]
fn rows_height(rows: usize, leading: f32) -> f32 {
    // Row counts are small, so the conversion is exact.
    rows as f32 * leading
}

#[expect(clippy::float_arithmetic, reason = "layout coordinates, not money")]
fn right_aligned_x(right: f32, font: Font, size: f32, text: &[u8]) -> f32 {
    right - units_to_points(font.text_units(text), size)
}

/// Glyph-width units (1/1000 of the font size) to points.
#[expect(clippy::float_arithmetic, reason = "layout coordinates, not money")]
fn units_to_points(units: u32, size: f32) -> f32 {
    units as f32 * size / 1000.0
}

/// How many glyph-width units fit in `width` points at this font size (rounded down).
#[expect(clippy::float_arithmetic, reason = "layout coordinates, not money")]
fn units_for_width(width: f32, size: f32) -> u32 {
    // `as` saturates: a negative or NaN width gives 0.
    (width * 1000.0 / size) as u32
}

// ---------------------------------------------------------------------------------------------
// Fonts, encoding and line breaking
// ---------------------------------------------------------------------------------------------

/// The two base-14 fonts used, each registered in every page's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Font {
    Regular,
    Bold,
}

impl Font {
    const ALL: [(Font, Ref); 2] = [(Font::Regular, REGULAR_FONT_ID), (Font::Bold, BOLD_FONT_ID)];

    fn resource_name(self) -> Name<'static> {
        match self {
            Font::Regular => Name(b"F1"),
            Font::Bold => Name(b"F2"),
        }
    }

    fn base_font(self) -> Name<'static> {
        match self {
            Font::Regular => Name(b"Helvetica"),
            Font::Bold => Name(b"Helvetica-Bold"),
        }
    }

    /// Advance width of one WinAnsi byte, in 1/1000 of the font size (Adobe's AFM metrics).
    /// Bytes outside printable ASCII get a generous width, so text measured with it never
    /// overflows its column.
    fn glyph_width(self, byte: u8) -> u32 {
        let table = match self {
            Font::Regular => &HELVETICA_WIDTHS,
            Font::Bold => &HELVETICA_BOLD_WIDTHS,
        };
        match byte.checked_sub(b' ') {
            Some(index) if usize::from(index) < table.len() => u32::from(table[usize::from(index)]),
            _ => NON_ASCII_WIDTH,
        }
    }

    fn text_units(self, text: &[u8]) -> u32 {
        text.iter().map(|&byte| self.glyph_width(byte)).sum()
    }
}

/// Widths of ` ` (32) to `~` (126) in Helvetica.
#[rustfmt::skip]
const HELVETICA_WIDTHS: [u16; 95] = [
    278, 278, 355, 556, 556, 889, 667, 191, 333, 333, 389, 584, 278, 333, 278, 278, // ' '..'/'
    556, 556, 556, 556, 556, 556, 556, 556, 556, 556, 278, 278, 584, 584, 584, 556, // '0'..'?'
    1015, 667, 667, 722, 722, 667, 611, 778, 722, 278, 500, 667, 556, 833, 722, 778, // '@'..'O'
    667, 778, 722, 667, 611, 722, 667, 944, 667, 667, 611, 278, 278, 278, 469, 556, // 'P'..'_'
    333, 556, 556, 500, 556, 556, 278, 556, 556, 222, 222, 500, 222, 833, 556, 556, // '`'..'o'
    556, 556, 333, 500, 278, 556, 500, 722, 500, 500, 500, 334, 260, 334, 584,      // 'p'..'~'
];

/// Widths of ` ` (32) to `~` (126) in Helvetica-Bold.
#[rustfmt::skip]
const HELVETICA_BOLD_WIDTHS: [u16; 95] = [
    278, 333, 474, 556, 556, 889, 722, 238, 333, 333, 389, 584, 278, 333, 278, 278, // ' '..'/'
    556, 556, 556, 556, 556, 556, 556, 556, 556, 556, 333, 333, 584, 584, 584, 611, // '0'..'?'
    975, 722, 722, 722, 722, 667, 611, 778, 722, 278, 556, 722, 611, 833, 722, 778, // '@'..'O'
    667, 778, 722, 667, 611, 722, 667, 944, 667, 667, 611, 333, 278, 333, 584, 556, // 'P'..'_'
    333, 556, 611, 556, 611, 556, 333, 611, 611, 278, 278, 556, 278, 889, 611, 611, // '`'..'o'
    611, 611, 389, 556, 333, 611, 556, 778, 556, 556, 500, 389, 280, 389, 584,      // 'p'..'~'
];

/// Width assumed for bytes 128..=255 (accented letters are 500–778; a few symbols are 1000).
const NON_ASCII_WIDTH: u32 = 778;

/// The characters WinAnsi places in 0x80..=0x9F (where Latin-1 has control codes).
const WIN_ANSI_EXTRAS: [(char, u8); 27] = [
    ('€', 0x80),
    ('‚', 0x82),
    ('ƒ', 0x83),
    ('„', 0x84),
    ('…', 0x85),
    ('†', 0x86),
    ('‡', 0x87),
    ('ˆ', 0x88),
    ('‰', 0x89),
    ('Š', 0x8A),
    ('‹', 0x8B),
    ('Œ', 0x8C),
    ('Ž', 0x8E),
    ('‘', 0x91),
    ('’', 0x92),
    ('“', 0x93),
    ('”', 0x94),
    ('•', 0x95),
    ('–', 0x96),
    ('—', 0x97),
    ('˜', 0x98),
    ('™', 0x99),
    ('š', 0x9A),
    ('›', 0x9B),
    ('œ', 0x9C),
    ('ž', 0x9E),
    ('Ÿ', 0x9F),
];

/// Encodes text for a `WinAnsiEncoding` font: printable Latin-1 maps to itself, the WinAnsi
/// extras (`€`, curly quotes, dashes, …) to their codes, whitespace controls to a space, and
/// everything else to `?`. Escaping for the content stream is done by [`Str`].
fn encode_win_ansi(text: &str) -> Vec<u8> {
    text.chars().map(win_ansi_byte).collect()
}

fn win_ansi_byte(c: char) -> u8 {
    match c {
        ' '..='~' | '\u{A0}'..='\u{FF}' => u8::try_from(c).unwrap_or(b'?'),
        '\t' | '\n' | '\r' => b' ',
        _ => WIN_ANSI_EXTRAS
            .iter()
            .find(|(extra, _)| *extra == c)
            .map_or(b'?', |&(_, byte)| byte),
    }
}

/// Cuts `text` to fit `max_units`, ending it with `...` when anything was cut.
fn truncate(text: &[u8], font: Font, max_units: u32) -> Vec<u8> {
    if font.text_units(text) <= max_units {
        return text.to_vec();
    }
    let budget = max_units.saturating_sub(font.text_units(ELLIPSIS));
    let mut used = 0;
    let mut cut: Vec<u8> = text
        .iter()
        .copied()
        .take_while(|&byte| {
            used += font.glyph_width(byte);
            used <= budget
        })
        .collect();
    cut.truncate(cut.trim_ascii_end().len());
    cut.extend_from_slice(ELLIPSIS);
    cut
}

/// Greedy word wrap to `max_units` per line; words wider than a line are split.
fn wrap(text: &[u8], font: Font, max_units: u32) -> Vec<Vec<u8>> {
    let space = font.glyph_width(b' ');
    let mut lines = Vec::new();
    let mut line: Vec<u8> = Vec::new();
    let mut line_units = 0;
    for word in text
        .split(|&byte| byte == b' ')
        .filter(|word| !word.is_empty())
    {
        let word_units = font.text_units(word);
        if !line.is_empty() && line_units + space + word_units <= max_units {
            line.push(b' ');
            line.extend_from_slice(word);
            line_units += space + word_units;
            continue;
        }
        if !line.is_empty() {
            lines.push(std::mem::take(&mut line));
            line_units = 0;
        }
        for &byte in word {
            let width = font.glyph_width(byte);
            if !line.is_empty() && line_units + width > max_units {
                lines.push(std::mem::take(&mut line));
                line_units = 0;
            }
            line.push(byte);
            line_units += width;
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// [`wrap`], keeping at most `max_lines` lines; the last kept line ends with `...` if text
/// was dropped.
fn wrap_limited(text: &[u8], font: Font, max_units: u32, max_lines: usize) -> Vec<Vec<u8>> {
    let mut lines = wrap(text, font, max_units);
    if max_lines > 0 && lines.len() > max_lines {
        let rest = lines.split_off(max_lines - 1).join(&b' ');
        // Always too wide (it holds at least two lines), so it gets the ellipsis.
        lines.push(truncate(&rest, font, max_units));
    }
    lines
}

// ---------------------------------------------------------------------------------------------
// Document structure
// ---------------------------------------------------------------------------------------------

/// Catalog, page tree, fonts, document info and one page object plus content stream per page.
fn write_document(invoice: &Invoice, pages: Vec<Content>) -> Vec<u8> {
    let mut pdf = Pdf::new();
    pdf.catalog(CATALOG_ID).pages(PAGE_TREE_ID);
    pdf.document_info(INFO_ID)
        .title(TextStr(&invoice.number))
        .producer(TextStr("Tollgate"));
    for (font, id) in Font::ALL {
        pdf.type1_font(id)
            .base_font(font.base_font())
            .encoding_predefined(Name(b"WinAnsiEncoding"));
    }

    let mut next_id = FIRST_PAGE_ID;
    let ids: Vec<(Ref, Ref)> = pages
        .iter()
        .map(|_| (next_id.bump(), next_id.bump()))
        .collect();
    pdf.pages(PAGE_TREE_ID)
        .kids(ids.iter().map(|&(page_id, _)| page_id))
        .count(i32::try_from(ids.len()).unwrap_or(i32::MAX));

    for (&(page_id, content_id), content) in ids.iter().zip(pages) {
        {
            let mut page = pdf.page(page_id);
            page.parent(PAGE_TREE_ID)
                .media_box(Rect::new(0.0, 0.0, PAGE_WIDTH, PAGE_HEIGHT))
                .contents(content_id);
            let mut resources = page.resources();
            let mut fonts = resources.fonts();
            for (font, id) in Font::ALL {
                fonts.pair(font.resource_name(), id);
            }
        }
        pdf.stream(content_id, &content.finish());
    }
    pdf.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lopdf::Document;

    fn dec(s: &str) -> Decimal {
        s.parse().expect("valid decimal")
    }

    fn line(description: &str, quantity: u32, unit_price: &str, amount: &str) -> InvoiceLine {
        InvoiceLine {
            description: description.to_owned(),
            quantity,
            unit_price: dec(unit_price),
            amount: dec(amount),
        }
    }

    /// 9.99 + 2 × 1.50 = 12.99, minus 1.10 discount = 11.89 paid, of which 19 % tax is 1.90.
    fn sample_invoice() -> Invoice {
        Invoice {
            id: "inv_01".to_owned(),
            number: "INV-2026-000123".to_owned(),
            order_id: "ord_42".to_owned(),
            account_id: "acct_7".to_owned(),
            issued_at: "2026-03-14T09:30:00Z".to_owned(),
            currency: "USD".to_owned(),
            seller: Party {
                name: "Tollgate GmbH".to_owned(),
                address: vec!["Hauptstraße 1".to_owned(), "10115 Berlin".to_owned()],
                email: Some("billing@tollgate.example".to_owned()),
                tax_id: Some("DE123456789".to_owned()),
            },
            buyer: Party {
                name: "Acme (Europe) Ltd".to_owned(),
                address: vec!["1 Main Street".to_owned(), "Dublin".to_owned()],
                email: Some("ap@acme.example".to_owned()),
                tax_id: Some("IE9876543X".to_owned()),
            },
            lines: vec![
                line("Starter credit pack", 1, "9.99", "9.99"),
                line("Top-up credits \\ extra", 2, "1.50", "3.00"),
            ],
            subtotal: dec("12.99"),
            discount: dec("1.10"),
            tax_rate_percent: dec("19"),
            tax: dec("1.90"),
            total_excluding_tax: dec("9.99"),
            total: dec("11.89"),
            notes: vec!["Credits expire 365 days after purchase.".to_owned()],
        }
    }

    fn load(bytes: &[u8]) -> Document {
        Document::load_mem(bytes).expect("rendered PDF parses")
    }

    fn page_text(doc: &Document, page: u32) -> String {
        doc.extract_text(&[page]).expect("text extracts")
    }

    #[test]
    fn renders_a_parseable_pdf_with_the_invoice_text() {
        let bytes = render(&sample_invoice());
        assert!(bytes.starts_with(b"%PDF-"));
        assert!(bytes.trim_ascii_end().ends_with(b"%%EOF"));

        let doc = load(&bytes);
        assert_eq!(doc.get_pages().len(), 1);
        let text = page_text(&doc, 1);
        for expected in [
            "INVOICE",
            "INV-2026-000123",
            "Issue date: 2026-03-14",
            "Order: ord_42",
            "Tollgate GmbH",
            "Hauptstraße 1",
            "Tax ID: DE123456789",
            "Bill to",
            "Acme (Europe) Ltd",
            "ap@acme.example",
            "Account: acct_7",
            "Starter credit pack",
            "Top-up credits \\ extra",
            "9.99 USD",
            "3.00 USD",
            "12.99 USD",
            "Discount",
            "-1.10 USD",
            "Total excluding tax",
            "Tax (19%)",
            "1.90 USD",
            "11.89 USD",
            "Credits expire 365 days after purchase.",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn sets_document_info() {
        let doc = load(&render(&sample_invoice()));
        let info_ref = doc
            .trailer
            .get(b"Info")
            .and_then(lopdf::Object::as_reference)
            .expect("trailer has /Info");
        let info = doc.get_dictionary(info_ref).expect("info dictionary");
        let title = info.get(b"Title").and_then(lopdf::Object::as_str);
        assert_eq!(title.expect("title"), b"INV-2026-000123");
        let producer = info.get(b"Producer").and_then(lopdf::Object::as_str);
        assert_eq!(producer.expect("producer"), b"Tollgate");
    }

    #[test]
    fn omits_a_zero_discount() {
        let mut invoice = sample_invoice();
        invoice.discount = Decimal::ZERO;
        let text = page_text(&load(&render(&invoice)), 1);
        assert!(!text.contains("Discount"), "{text}");
    }

    #[test]
    fn many_lines_continue_on_more_pages() {
        let mut invoice = sample_invoice();
        // Notes may flow onto a page of their own; without them the last page holds the
        // end of the table (kept together with the totals).
        invoice.notes.clear();
        invoice.lines = (1..=80)
            .map(|i| line(&format!("Credit pack number {i}"), 1, "1.00", "1.00"))
            .collect();
        let doc = load(&render(&invoice));
        let pages = doc.get_pages();
        assert!(pages.len() > 1, "{} page(s)", pages.len());

        let last_page = u32::try_from(pages.len()).expect("few pages");
        let last_text = page_text(&doc, last_page);
        assert!(last_text.contains("Credit pack number 80"), "{last_text}");
        assert!(
            last_text.contains("Description"),
            "header repeats: {last_text}"
        );
        assert!(last_text.contains(&format!("Page {last_page} of {last_page}")));
    }

    #[test]
    fn totals_stay_on_the_page_of_the_last_line() {
        for count in 30..=110 {
            let mut invoice = sample_invoice();
            invoice.lines = (1..=count)
                .map(|i| line(&format!("Pack {i}"), 1, "1.00", "1.00"))
                .collect();
            let doc = load(&render(&invoice));
            let pages = u32::try_from(doc.get_pages().len()).expect("few pages");
            let with_totals: Vec<u32> = (1..=pages)
                .filter(|&page| page_text(&doc, page).contains("Total excluding tax"))
                .collect();
            assert_eq!(with_totals.len(), 1, "{count} lines");
            let text = page_text(&doc, with_totals[0]);
            assert!(
                text.contains(&format!("Pack {count}\n")),
                "{count} lines: {text}"
            );
        }
    }

    #[test]
    fn long_descriptions_wrap_and_are_cut() {
        let mut invoice = sample_invoice();
        let long = "word ".repeat(200);
        invoice.lines = vec![line(&long, 1, "1.00", "1.00")];
        let text = page_text(&load(&render(&invoice)), 1);
        let description: Vec<&str> = text.lines().filter(|l| l.starts_with("word")).collect();
        assert_eq!(description.len(), MAX_DESCRIPTION_LINES, "{text}");
        assert!(description.iter().all(|l| l.len() < 60), "{text}");
        assert!(
            description[MAX_DESCRIPTION_LINES - 1].ends_with("..."),
            "{text}"
        );
    }

    #[test]
    fn characters_outside_win_ansi_become_question_marks() {
        let mut invoice = sample_invoice();
        invoice.buyer.name = "株式会社 Example".to_owned();
        invoice.notes = vec!["Thanks — “quoted” 5 €".to_owned()];
        let bytes = render(&invoice);
        let text = page_text(&load(&bytes), 1);
        assert!(text.contains("???? Example"), "{text}");
        assert!(text.contains("Thanks — “quoted” 5 €"), "{text}");
    }

    /// What would make the same invoice render to other bytes later (the download a buyer
    /// gets again months on): a timestamp or a random file id.
    #[test]
    fn carries_no_timestamp_or_random_file_id() {
        let doc = load(&render(&sample_invoice()));
        assert!(doc.trailer.get(b"ID").is_err(), "a file /ID in the trailer");
        let info_ref = doc
            .trailer
            .get(b"Info")
            .and_then(lopdf::Object::as_reference)
            .expect("trailer has /Info");
        let info = doc.get_dictionary(info_ref).expect("info dictionary");
        for key in [&b"CreationDate"[..], b"ModDate"] {
            assert!(
                info.get(key).is_err(),
                "/Info has {}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn encodes_win_ansi() {
        assert_eq!(encode_win_ansi("aé€—"), vec![b'a', 0xE9, 0x80, 0x97]);
        assert_eq!(encode_win_ansi("日\u{80}\u{1F600}\t"), b"??? ".to_vec());
    }

    #[test]
    fn formats_money_with_the_currency_decimals() {
        assert_eq!(format_money(dec("1200"), "JPY"), "1200 JPY");
        assert_eq!(format_money(dec("1.2345"), "KWD"), "1.235 KWD");
        assert_eq!(format_money(dec("9.9"), "USD"), "9.90 USD");
        assert_eq!(format_money(dec("10"), "EUR"), "10.00 EUR");
        assert_eq!(format_money(dec("0.125"), "EUR"), "0.13 EUR");
        assert_eq!(format_money(dec("-1.1"), "EUR"), "-1.10 EUR");
    }

    #[test]
    fn wraps_and_truncates_to_width() {
        let font = Font::Regular;
        let max = font.text_units(b"aaaa aaaa");
        assert_eq!(
            wrap(b"aaaa aaaa aaaa", font, max),
            vec![b"aaaa aaaa".to_vec(), b"aaaa".to_vec()]
        );
        assert_eq!(wrap(b"", font, max), vec![Vec::<u8>::new()]);
        let split = wrap(&[b'a'; 30], font, max);
        assert!(split.iter().all(|l| font.text_units(l) <= max));
        assert_eq!(split.concat(), vec![b'a'; 30]);
        let cut = truncate(b"aaaaaaaaaaaaaaaaaaaa", font, max);
        assert!(cut.ends_with(ELLIPSIS) && font.text_units(&cut) <= max);
    }
}
