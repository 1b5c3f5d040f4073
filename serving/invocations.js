// POST /invocations for nginx's njs module (nginx.conf.template): TF Serving's predict JSON goes to
// TF Serving as it is; a raw image body (what SageMaker clients and Batch Transform send with an
// image content type) becomes the JSON of one instance, so both forms of one image get the same
// answer. Uses only what njs 0.7.9 (Debian 12's package) has; newer njs releases keep these APIs.

const PREDICT = '/_predict'; // the internal location that proxies to TF Serving's :predict
const JSON_TYPE = 'application/json';
const IMAGE_TYPES = ['image/jpeg', 'image/png', 'image/gif', 'application/x-image'];

function fail(r, status, message) {
    r.headersOut['Content-Type'] = JSON_TYPE;
    r.return(status, JSON.stringify({error: message}) + '\n');
}

// The media type without its parameters: "application/json; charset=utf-8" is JSON.
function mediaType(r) {
    const header = r.headersIn['Content-Type'] || '';
    return header.split(';')[0].trim().toLowerCase();
}

async function invocations(r) {
    const type = mediaType(r);
    if (type === JSON_TYPE) {
        r.internalRedirect(PREDICT);
        return;
    }
    if (!IMAGE_TYPES.includes(type)) {
        const got = type ? `Content-Type ${JSON.stringify(r.headersIn['Content-Type'])}` : 'no Content-Type';
        fail(r, 415, `/invocations: ${got}: send ${JSON_TYPE} (the TF Serving predict body) or an image `
            + `as the body with Content-Type ${IMAGE_TYPES.join(', ')}`);
        return;
    }
    const image = r.requestBuffer;
    if (!image || image.length === 0) {
        fail(r, 400, `/invocations: empty body: send the image file's bytes (Content-Type ${type})`);
        return;
    }
    const body = JSON.stringify({
        signature_name: 'serving_default',
        instances: [{inputs: {b64: image.toString('base64')}}],
    });
    const answer = await r.subrequest(PREDICT, {method: 'POST', body: body});
    r.headersOut['Content-Type'] = answer.headersOut['Content-Type'] || JSON_TYPE;
    r.return(answer.status, answer.responseBuffer);
}

export default {invocations};
