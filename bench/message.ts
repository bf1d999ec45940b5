/**
 * Bench fixture: a realistic mail message of a chosen size, as the bytes an SMTP client
 * sends after the 354 (dot-stuffed, CRLF line endings, ending with the final `.` line).
 *
 * The header block looks like what an MX sees from a bulk sender (two Received, a
 * DKIM-Signature, List-Unsubscribe, MIME headers …, about 1.5 KB); the body is plain text
 * wrapped at 72 columns and filled up to the requested total size. Deterministic: the same
 * size always yields the same bytes, so every target gets identical input.
 *
 * It does not vary per message (the gateway does not care about duplicate Message-IDs) and
 * does not build MIME multiparts.
 */

const WORDS = (
  'the quarterly report is attached and summarises revenue growth across all regions ' +
  'please review the figures before our meeting on thursday and send any questions ' +
  'we have also updated the shipping schedule for the next release so check the ' +
  'calendar invite for details about the new milestones and the budget allocation'
).split(' ');

const HEADERS = [
  'Received: from mail-out.sender.example (mail-out.sender.example [192.0.2.25])',
  '\tby relay.sender.example (Postfix) with ESMTPS id 4XyZ1a2b3c',
  '\tfor <bob@example.test>; Tue, 12 Mar 2024 10:15:30 +0000 (UTC)',
  'Received: from [10.0.0.12] (unknown [10.0.0.12])',
  '\tby mail-out.sender.example (Postfix) with ESMTPSA id 9F3C2A0123',
  '\tfor <bob@example.test>; Tue, 12 Mar 2024 10:15:29 +0000 (UTC)',
  'DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=sender.example;',
  '\ts=mail2024; t=1710238529; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;',
  '\th=From:To:Subject:Date:Message-ID:MIME-Version:Content-Type;',
  '\tb=dGhpcyBpcyBub3QgYSByZWFsIHNpZ25hdHVyZSBidXQgaXQgbG9va3MgbGlrZSBvbmUgYW5k',
  '\t IGl0IGlzIGFib3V0IGFzIGxvbmcgYXMgYSAyMDQ4IGJpdCBSU0Egc2lnbmF0dXJlIGVuY29kZWQg',
  '\t aW4gYmFzZTY0IHNvIHRoZSBoZWFkZXIgYmxvY2sgaGFzIGEgcmVhbGlzdGljIHNpemU=',
  'From: "Alice Sender" <alice@sender.example>',
  'To: "Bob Receiver" <bob@example.test>',
  'Cc: team@example.test',
  'Subject: Quarterly report and updated shipping schedule',
  'Date: Tue, 12 Mar 2024 10:15:29 +0000',
  'Message-ID: <20240312101529.4XyZ1a2b3c@sender.example>',
  'MIME-Version: 1.0',
  'Content-Type: text/plain; charset="utf-8"; format=flowed',
  'Content-Transfer-Encoding: 8bit',
  'List-Unsubscribe: <mailto:unsubscribe@sender.example?subject=unsubscribe>,',
  '\t<https://sender.example/unsubscribe?id=4XyZ1a2b3c>',
  'List-Unsubscribe-Post: List-Unsubscribe=One-Click',
  'X-Mailer: Bench Mailer 1.0',
  'Authentication-Results: relay.sender.example; spf=pass smtp.mailfrom=sender.example',
];

/** The message (headers, blank line, body), `size` bytes (at least the header block), CRLF. */
export function buildMessage(size: number): Buffer {
  const head = HEADERS.join('\r\n') + '\r\n\r\n';
  const lines: string[] = [];
  let total = Buffer.byteLength(head);
  let line = '';
  let w = 0;
  while (total < size) {
    const word = WORDS[w++ % WORDS.length]!;
    if (line.length + word.length + 1 > 72) {
      // Every 12th line is empty: paragraphs.
      const out = lines.length % 12 === 11 ? '' : line;
      if (total + out.length + 2 > size) break;
      lines.push(out);
      total += out.length + 2;
      line = '';
    }
    line = line ? `${line} ${word}` : word;
  }
  let body = lines.join('\r\n');
  if (lines.length) body += '\r\n';
  // Pad the last line to hit the size exactly (when there is room for a line at all).
  const missing = size - total;
  if (missing >= 3) body += 'x'.repeat(missing - 2) + '\r\n';
  return Buffer.from(head + body, 'latin1');
}

/** What goes on the wire after the 354: dot-stuffed content and the final `.` line. */
export function wireData(message: Buffer): Buffer {
  const text = message.toString('latin1').replace(/(^|\r\n)\./g, '$1..');
  const tail = text.endsWith('\r\n') ? '.\r\n' : '\r\n.\r\n';
  return Buffer.from(text + tail, 'latin1');
}
